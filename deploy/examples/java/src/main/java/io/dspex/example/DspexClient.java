package io.dspex.example;

import io.dspex.Request;
import io.dspex.Response;
import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.time.Instant;
import java.time.temporal.ChronoUnit;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.ExecutionException;
import java.util.function.Consumer;
import org.apache.avro.AvroRuntimeException;
import org.apache.avro.Schema;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

/**
 * DSPex's wire contract (README, "Wire contract for any language"), rule by rule, with
 * nothing but the generated Avro classes and Apache Kafka's client.
 *
 * <p>One request at a time: a service answering many callers would keep one such consumer
 * and hand each chunk to the waiter registered under its request id.
 */
public final class DspexClient implements AutoCloseable {
  /** Rule 3: the content type header of a Request. */
  public static final String CONTENT_TYPE = "application/vnd.dspex.request+avro";
  /** Rule 6: how long past deadline_at to wait for the server's own timeout reply. */
  public static final Duration DEFAULT_GRACE = Duration.ofSeconds(2);

  private final KafkaProducer<String, byte[]> producer;
  private final KafkaConsumer<String, byte[]> consumer;
  private final BinaryMessageDecoder<Response> decoder;
  private final String requestsTopic;
  private final String replyTopic;
  private final String listenTopic;
  private final Duration grace;

  /**
   * Opens the producer and the reply consumer; fails when the reply topic does not exist.
   *
   * @param replyTopic a topic of the caller's own, or null for the shared {@code
   *     <prefix>responses}
   * @param grace how long past a request's deadline to wait for its final chunk (rule 6)
   */
  public DspexClient(String bootstrap, String prefix, String replyTopic, Duration grace) {
    this.grace = grace;
    this.requestsTopic = prefix + "requests";
    this.replyTopic = replyTopic;
    this.listenTopic = replyTopic != null ? replyTopic : prefix + "responses";
    this.decoder = responseDecoder();
    this.producer = new KafkaProducer<>(producerConfig(bootstrap));
    this.consumer = new KafkaConsumer<>(consumerConfig(bootstrap));
    try {
      listenFromTheEnd();
    } catch (RuntimeException e) {
      close();
      throw e;
    }
  }

  /** The topic replies are read from. */
  public String listenTopic() {
    return listenTopic;
  }

  /** Rule 1: a Request with a fresh request id, the creation time and this client's reply topic. */
  public Request.Builder newRequest(Duration deadline) {
    Instant now = Instant.now().truncatedTo(ChronoUnit.MILLIS);
    return Request.newBuilder()
        .setRequestId(UUID.randomUUID().toString())
        .setCreatedAt(now)
        .setDeadlineAt(now.plus(deadline))
        .setReplyTopic(replyTopic);
  }

  /** Produces {@code request}, then hands each of its chunks to {@code onChunk} in seq order. */
  public Answer call(Request request, Consumer<Response> onChunk) {
    send(request);
    return await(request, onChunk);
  }

  /** Rules 1-3: single-object encoding, the key, the headers, an idempotent producer. */
  public void send(Request request) {
    String key = request.getSessionId() != null ? request.getSessionId() : request.getRequestId();
    ProducerRecord<String, byte[]> record =
        new ProducerRecord<>(requestsTopic, key, encode(request));
    header(record, "dspex-request-id", request.getRequestId());
    if (request.getReplyTopic() != null) {
      header(record, "dspex-reply-topic", request.getReplyTopic());
    }
    header(record, "content-type", CONTENT_TYPE);
    try {
      producer.send(record).get();
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
      throw new IllegalStateException("interrupted while producing to " + requestsTopic, e);
    } catch (ExecutionException e) {
      throw new IllegalStateException(
          "cannot produce request " + request.getRequestId() + " to " + requestsTopic, e.getCause());
    }
  }

  /** Rules 5 and 6: this request's chunks, deduplicated and in order, until the final one. */
  public Answer await(Request request, Consumer<Response> onChunk) {
    String id = request.getRequestId();
    Instant deadline = request.getDeadlineAt();
    Instant giveUp = deadline != null ? deadline.plus(grace) : Instant.now().plusSeconds(300);
    ChunkOrder order = new ChunkOrder();
    StringBuilder text = new StringBuilder();
    while (Instant.now().isBefore(giveUp)) {
      Duration left = Duration.between(Instant.now(), giveUp);
      for (ConsumerRecord<String, byte[]> message : consumer.poll(min(left, 200))) {
        Response chunk = decode(message);
        if (chunk == null || !id.equals(chunk.getRequestId())) {
          continue; // the shared topic carries every client's replies
        }
        for (Response next : order.accept(chunk)) {
          text.append(next.getDelta());
          onChunk.accept(next);
          if (next.getFinal$()) {
            return new Answer(id, next, text.toString(), order.delivered(), order.duplicates());
          }
        }
      }
    }
    throw new RequestTimeout(id, deadline, grace, order.delivered());
  }

  @Override
  public void close() {
    producer.close(Duration.ofSeconds(5));
    consumer.close(Duration.ofSeconds(5));
  }

  /** Rule 4: every partition of the reply topic, positioned at its end before any request. */
  private void listenFromTheEnd() {
    List<PartitionInfo> partitions = consumer.partitionsFor(listenTopic, Duration.ofSeconds(30));
    if (partitions == null || partitions.isEmpty()) {
      // The router would answer such a request on the shared responses topic, which this
      // client does not read: refuse before producing anything.
      throw new IllegalArgumentException(
          "reply topic " + listenTopic + " does not exist: create it first");
    }
    List<TopicPartition> assigned = new ArrayList<>();
    for (PartitionInfo info : partitions) {
      assigned.add(new TopicPartition(listenTopic, info.partition()));
    }
    consumer.assign(assigned);
    consumer.seekToEnd(assigned);
    for (TopicPartition partition : assigned) {
      consumer.position(partition, Duration.ofSeconds(30)); // seekToEnd is lazy: resolve it now
    }
  }

  private static byte[] encode(Request request) {
    try {
      ByteBuffer buffer = request.toByteBuffer(); // C3 01, CRC-64-AVRO fingerprint, body
      byte[] bytes = new byte[buffer.remaining()];
      buffer.get(bytes);
      return bytes;
    } catch (IOException e) {
      throw new UncheckedIOException("cannot encode request " + request.getRequestId(), e);
    }
  }

  private Response decode(ConsumerRecord<String, byte[]> message) {
    try {
      return decoder.decode(message.value());
    } catch (IOException | AvroRuntimeException e) {
      System.err.printf(
          "skipping undecodable reply topic=%s partition=%d offset=%d: %s%n",
          message.topic(), message.partition(), message.offset(), e);
      return null;
    }
  }

  /** A decoder of the current Response that also reads every released version. */
  private static BinaryMessageDecoder<Response> responseDecoder() {
    BinaryMessageDecoder<Response> decoder = Response.createDecoder(null);
    for (int version = 1; ; version++) {
      String path = "/dspex/history/Response.v" + version + ".avsc";
      try (InputStream in = DspexClient.class.getResourceAsStream(path)) {
        if (in == null) {
          return decoder;
        }
        decoder.addSchema(new Schema.Parser().parse(in));
      } catch (IOException e) {
        throw new UncheckedIOException("cannot read " + path, e);
      }
    }
  }

  private static void header(ProducerRecord<String, byte[]> record, String name, String value) {
    record.headers().add(name, value.getBytes(StandardCharsets.UTF_8));
  }

  private static Duration min(Duration left, long millis) {
    return Duration.ofMillis(Math.max(0, Math.min(left.toMillis(), millis)));
  }

  private static Properties producerConfig(String bootstrap) {
    Properties config = new Properties();
    config.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    config.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
    config.put(ProducerConfig.ACKS_CONFIG, "all");
    config.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
    config.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
    return config;
  }

  private static Properties consumerConfig(String bootstrap) {
    Properties config = new Properties();
    config.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    // assigned partitions, no group: nothing committed, nothing replayed on the next start
    config.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    config.put(ConsumerConfig.ALLOW_AUTO_CREATE_TOPICS_CONFIG, "false");
    config.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
    config.put(
        ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    return config;
  }
}
