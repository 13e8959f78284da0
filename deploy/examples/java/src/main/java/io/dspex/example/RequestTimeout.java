package io.dspex.example;

import java.time.Duration;
import java.time.Instant;

/** Rule 6: no final chunk arrived by the request's deadline plus the grace. */
public final class RequestTimeout extends RuntimeException {
  private static final long serialVersionUID = 1L;

  RequestTimeout(String requestId, Instant deadline, Duration grace, int chunks) {
    super(
        "request "
            + requestId
            + ": no final chunk by its deadline "
            + deadline
            + " (+"
            + grace.toMillis() / 1000.0
            + "s grace); "
            + chunks
            + " chunk(s) received");
  }
}
