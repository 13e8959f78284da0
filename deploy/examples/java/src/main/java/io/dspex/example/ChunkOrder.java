package io.dspex.example;

import io.dspex.Response;
import java.util.ArrayList;
import java.util.List;
import java.util.TreeMap;

/**
 * Rule 5 for one request: chunks in {@code seq} order, each {@code seq} once.
 *
 * <p>Delivery is at-least-once (a worker that crashed after answering is redone by its
 * successor), so a {@code seq} may arrive twice; a chunk that arrives before its
 * predecessors waits for them.
 */
final class ChunkOrder {
  private final TreeMap<Integer, Response> waiting = new TreeMap<>();
  private int next;
  private int duplicates;

  /** The chunks that {@code chunk} makes deliverable, in order; empty for a duplicate. */
  List<Response> accept(Response chunk) {
    int seq = chunk.getSeq();
    if (seq < next || waiting.containsKey(seq)) {
      duplicates++;
      return List.of();
    }
    waiting.put(seq, chunk);
    List<Response> ready = new ArrayList<>();
    while (waiting.containsKey(next)) {
      ready.add(waiting.remove(next));
      next++;
    }
    return ready;
  }

  /** How many chunks were delivered in order. */
  int delivered() {
    return next;
  }

  /** How many duplicate chunks were dropped. */
  int duplicates() {
    return duplicates;
  }
}
