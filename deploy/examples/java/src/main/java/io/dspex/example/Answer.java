package io.dspex.example;

import io.dspex.ErrorInfo;
import io.dspex.Response;

/**
 * The outcome of one request: its final chunk, the streamed text and chunk counts.
 *
 * @param text the concatenated {@code delta} of every chunk, in {@code seq} order
 * @param chunks chunks delivered, the final one included
 * @param duplicates duplicate chunks dropped
 */
public record Answer(
    String requestId, Response last, String text, int chunks, int duplicates) {

  /** Rule 5: only a final {@code ok} is a success; any other status carries an error. */
  public boolean ok() {
    return "ok".equals(last.getStatus());
  }

  /** Why the request failed (null when it did not). */
  public ErrorInfo error() {
    return last.getError();
  }
}
