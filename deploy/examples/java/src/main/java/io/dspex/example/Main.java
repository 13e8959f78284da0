package io.dspex.example;

import com.fasterxml.jackson.core.JsonProcessingException;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import io.dspex.ErrorInfo;
import io.dspex.Request;
import io.dspex.Response;
import java.time.Duration;
import java.util.ArrayDeque;
import java.util.Deque;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.apache.avro.SchemaNormalization;

/**
 * The command line: submit a request and print its answer, stream one and print each chunk,
 * or print the contract's fingerprints. Exit codes: 0 ok, 1 an error Response, 2 bad usage
 * or setup (a missing reply topic), 3 no final chunk by the deadline.
 */
public final class Main {
  private static final ObjectMapper JSON = new ObjectMapper();
  private static final String USAGE =
      String.join(
          "\n",
          "usage: java -jar target/dspex-java-client.jar [options] COMMAND",
          "  submit PROGRAM NAME=VALUE...  one request; prints the answer",
          "  stream PROGRAM NAME=VALUE...  a streamed request; prints each chunk as it comes",
          "  fingerprints                  CRC-64-AVRO fingerprints of Request and Response",
          "PROGRAM: an inline signature (\"question -> answer\") or a registered program id",
          "VALUE: text, sent as a JSON string; json:VALUE sends any JSON value (json:0.5)",
          "options: --bootstrap HOST:PORT  (default $KAFKA_BOOTSTRAP_SERVERS, else localhost:9092)",
          "         --prefix PREFIX        (default $DSPEX_TOPICS__PREFIX, else dspex.)",
          "         --reply-topic TOPIC    your own reply topic, which must exist",
          "                                (default: the shared <prefix>responses)",
          "         --deadline-s SECONDS   (default 30)",
          "         --grace-s SECONDS      wait this long past the deadline (default 2)",
          "         --session ID           key the request by this session");

  private Main() {}

  public static void main(String[] args) {
    System.exit(run(args));
  }

  static int run(String[] argv) {
    Deque<String> args = new ArrayDeque<>(List.of(argv));
    Map<String, String> options = new LinkedHashMap<>();
    while (!args.isEmpty() && args.peekFirst().startsWith("--")) {
      String name = args.removeFirst();
      if (args.isEmpty()) {
        return usage("option " + name + " needs a value");
      }
      options.put(name, args.removeFirst());
    }
    String command = args.pollFirst();
    if ("fingerprints".equals(command)) {
      printFingerprints();
      return 0;
    }
    if (!"submit".equals(command) && !"stream".equals(command) || args.isEmpty()) {
      return usage(command == null ? "no command" : "unknown command or no PROGRAM: " + command);
    }
    try {
      String program = args.removeFirst();
      Map<String, String> inputs = inputsOf(List.copyOf(args)); // checked before connecting
      return call(program, inputs, "stream".equals(command), options);
    } catch (IllegalArgumentException e) {
      System.err.println("error: " + e.getMessage());
      return 2;
    }
  }

  private static int call(
      String program, Map<String, String> inputs, boolean stream, Map<String, String> options) {
    String bootstrap =
        options.getOrDefault("--bootstrap", env("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"));
    String prefix = options.getOrDefault("--prefix", env("DSPEX_TOPICS__PREFIX", "dspex."));
    Duration deadline = seconds(options, "--deadline-s", "30");
    Duration grace = seconds(options, "--grace-s", "" + DspexClient.DEFAULT_GRACE.toSeconds());
    String replyTopic = options.get("--reply-topic");
    try (DspexClient client = new DspexClient(bootstrap, prefix, replyTopic, grace)) {
      Request.Builder builder = client.newRequest(deadline)
          .setStream(stream)
          .setSessionId(options.get("--session"))
          .setInputs(inputs);
      if (program.contains("->")) {
        builder.setSignature(program); // an inline program
      } else {
        builder.setProgramId(program); // a registered one
      }
      Request request = builder.build();
      System.out.printf(
          "request %s to %srequests, replies on %s%n",
          request.getRequestId(), prefix, client.listenTopic());
      Answer answer = client.call(request, stream ? Main::printChunk : chunk -> {});
      return report(answer, stream);
    } catch (RequestTimeout e) {
      System.out.println("timeout: " + e.getMessage());
      return 3;
    }
  }

  private static Map<String, String> inputsOf(List<String> pairs) {
    Map<String, String> inputs = new LinkedHashMap<>();
    for (String pair : pairs) {
      int eq = pair.indexOf('=');
      if (eq <= 0) {
        throw new IllegalArgumentException("input " + pair + ": expected NAME=VALUE");
      }
      inputs.put(pair.substring(0, eq), jsonValue(pair.substring(eq + 1)));
    }
    return inputs;
  }

  /** Rule 1: inputs are JSON-encoded values ({@code "\"Paris\""}, not {@code "Paris"}). */
  private static String jsonValue(String value) {
    try {
      if (value.startsWith("json:")) {
        return JSON.writeValueAsString(JSON.readTree(value.substring(5)));
      }
      return JSON.writeValueAsString(value);
    } catch (JsonProcessingException e) {
      throw new IllegalArgumentException("not a JSON value: " + value, e);
    }
  }

  private static void printChunk(Response chunk) {
    System.out.printf(
        "chunk %d %s%s %s%n",
        chunk.getSeq(),
        chunk.getStatus(),
        chunk.getFinal$() ? " final" : "",
        quoted(chunk.getDelta()));
    System.out.flush();
  }

  private static int report(Answer answer, boolean stream) {
    Response last = answer.last();
    if (!answer.ok()) {
      ErrorInfo error = answer.error();
      System.out.printf(
          "%s %s stage=%s field=%s retryable=%s: %s%n",
          last.getStatus(),
          error == null ? "-" : error.getErrorClass(),
          error == null ? null : error.getStage(),
          error == null ? null : error.getField(),
          error != null && error.getRetryable(),
          error == null ? "(no error info)" : error.getMessage());
      return 1;
    }
    System.out.printf(
        "ok pool=%s cached=%s chunks=%d duplicates=%d%n",
        last.getPool(), last.getCached(), answer.chunks(), answer.duplicates());
    if (stream) {
      System.out.println("text = " + answer.text());
    }
    Map<String, String> outputs = last.getOutputs() == null ? Map.of() : last.getOutputs();
    outputs.forEach((name, json) -> System.out.println(name + " = " + plain(json)));
    return 0;
  }

  /** An output value for people: a JSON string as its text, anything else as JSON. */
  private static String plain(String json) {
    try {
      JsonNode node = JSON.readTree(json);
      return node.isTextual() ? node.textValue() : json;
    } catch (JsonProcessingException e) {
      return json;
    }
  }

  private static String quoted(String text) {
    try {
      return JSON.writeValueAsString(text);
    } catch (JsonProcessingException e) {
      return text;
    }
  }

  private static void printFingerprints() {
    for (org.apache.avro.Schema schema : List.of(Request.SCHEMA$, Response.SCHEMA$)) {
      long fingerprint = SchemaNormalization.parsingFingerprint64(schema);
      System.out.printf("%s 0x%016x%n", schema.getFullName(), fingerprint);
    }
  }

  private static int usage(String problem) {
    System.err.println("error: " + problem);
    System.err.println(USAGE);
    return 2;
  }

  private static Duration seconds(Map<String, String> options, String name, String fallback) {
    String value = options.getOrDefault(name, fallback);
    try {
      return Duration.ofMillis(Math.round(Double.parseDouble(value) * 1000));
    } catch (NumberFormatException e) {
      throw new IllegalArgumentException(name + " " + value + ": not a number of seconds", e);
    }
  }

  private static String env(String name, String fallback) {
    String value = System.getenv(name);
    return value == null || value.isBlank() ? fallback : value;
  }
}
