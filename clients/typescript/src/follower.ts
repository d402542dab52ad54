/**
 * Follows CRM's customer change feed for a user, the way the integration service does: watch
 * with a resume token, reconnect with backoff, fall back to polling where watching is
 * disabled, relist when the token has expired, and never hand the same event over twice.
 *
 * Without it, every program that reacts to customer changes would have to rewrite those
 * rules, and the easy-to-miss ones (which token to continue from after a relist, when to stop
 * polling) are exactly where events get lost or repeated.
 *
 * @module
 */
import { setTimeout as sleep } from "node:timers/promises";

import { Code, ConnectError } from "@connectrpc/connect";

import { backoffDelay } from "./backoff.js";
import type { CrmClient } from "./clients.js";
import { RESUME_TOKEN_EXPIRED, RESUME_TOKEN_UNKNOWN_LOG, errorReason } from "./errors.js";
import {
  StartPosition,
  type Customer,
  type CustomerEvent,
  type Heartbeat,
} from "./gen/crm/v1/crm_pb.js";

/** What the follower hands over, one at a time, in feed order. */
export type FeedItem =
  | {
      /** A change from the log, in commit order, each exactly once per follower. */
      kind: "event";
      /** The change itself. */
      event: CustomerEvent;
      /** The token to save once this item is handled: resuming from it continues after it. */
      token: string;
    }
  | {
      /**
       * A customer as it is now, listed because the saved token could no longer be resumed
       * (retention deleted the events after it, or it came from another CRM database). Not a
       * CREATED event: the customer may be old, and changes between the token and the
       * listing are not known one by one, so reconcile rather than treat it as new.
       */
      kind: "relisted";
      /** The customer's current state. */
      customer: Customer;
      /**
       * The token to save once this item is handled. It stays the old token until the last
       * customer of the listing, so a program that stops mid-listing relists again on resume
       * instead of skipping the customers it had not seen; the last one carries the token of
       * the listing's snapshot.
       */
      token: string;
    }
  | {
      /**
       * The follower has caught up with the log: every change committed so far has been
       * handed over. Only when `signalLive` is set; sent after the start, and again after each
       * reconnect, fallback or relist once the follower has caught up again.
       */
      kind: "live";
      /** The token to save: the head of the log at that moment. */
      token: string;
    };

/** How the follower reads the feed at the moment. */
export type FeedMode = "stream" | "poll";

/** Where to start and how to behave; every field is optional. */
export interface FollowOptions {
  /** A token saved from an earlier item (or any resume token of the CRM API). Empty: start at `startPosition`. */
  token?: string;
  /** Where to start without a token. Default: the oldest event CRM keeps. */
  startPosition?: StartPosition;
  /** Stops the follower when aborted, as `close()` does. */
  signal?: AbortSignal;
  /** Deadline of every unary call, and of opening the watch stream, in ms. Default 5000. */
  callTimeoutMs?: number;
  /**
   * A watch stream silent this long (no event, no heartbeat) is reconnected, in ms. Keep it
   * above CRM's `--heartbeat-interval`. Default 30000.
   */
  idleTimeoutMs?: number;
  /** Pause between polls once caught up, while watching is unavailable, in ms. Default 500. */
  pollIntervalMs?: number;
  /** While polling, how often to try watching again, in ms. Default 10000. */
  streamProbeIntervalMs?: number;
  /** Consecutive failed streams before falling back to polling (UNIMPLEMENTED: at once). Default 3. */
  streamFailuresBeforePoll?: number;
  /** First reconnect delay, in ms; doubles per failure, with jitter. Default 100. */
  initialBackoffMs?: number;
  /** Largest reconnect delay, in ms. Default 5000. */
  maxBackoffMs?: number;
  /** Customers or events per ListCustomers / ListCustomerEvents call (1 to 1000). Default 1000. */
  pageSize?: number;
  /** Hand over `live` items when the follower has caught up. Default false. */
  signalLive?: boolean;
  /** Jitter source returning [0, 1); injectable for tests. Default Math.random. */
  random?: () => number;
  /** Called when the follower switches between watching and polling, for logs or metrics. */
  onModeChange?: (mode: FeedMode) => void;
}

/** ErrorInfo reasons of FAILED_PRECONDITION that mean: relist, then watch from the snapshot. */
const RELIST_REASONS = [RESUME_TOKEN_EXPIRED, RESUME_TOKEN_UNKNOWN_LOG];

/**
 * Codes worth retrying: the server or the network may be back in a moment. Anything else
 * (a malformed token, a token ahead of the log, missing credentials) would fail the same way
 * forever, so it ends the iteration with the error instead.
 */
const TRANSIENT = new Set([
  Code.Unavailable,
  Code.DeadlineExceeded,
  Code.Internal,
  Code.Unknown,
  Code.ResourceExhausted,
  Code.Aborted,
  Code.Canceled,
]);

/** How one watch stream ended. */
type StreamEnd =
  | { closed: true }
  | {
      closed: false;
      /** Why it ended; a stream that ends cleanly is reported as UNAVAILABLE. */
      error: ConnectError;
      /** The server accepted the call (response headers without an error). */
      opened: boolean;
      /** At least one message arrived. */
      progressed: boolean;
    };

/**
 * Follows CRM's customer feed from a token. Iterate it once with `for await`; read `token`
 * after each item to save the position; `close()` (or the `signal` option, or leaving the
 * loop) stops it promptly.
 */
export class CustomerFollower implements AsyncIterable<FeedItem> {
  readonly #crm: CrmClient;
  readonly #settings: Required<Omit<FollowOptions, "token" | "signal">>;
  readonly #abort = new AbortController();
  #token: string;
  /** The highest sequence handed over (or passed by a heartbeat or poll) in the current log. */
  #sequence = 0n;
  #mode: FeedMode = "stream";
  #failures = 0;
  #lastProbe = 0;
  /** A `live` item is due once the follower next catches up. */
  #liveDue = true;
  #iterated = false;

  constructor(crm: CrmClient, options: FollowOptions = {}) {
    this.#crm = crm;
    this.#token = options.token ?? "";
    this.#settings = {
      startPosition: options.startPosition ?? StartPosition.EARLIEST,
      callTimeoutMs: options.callTimeoutMs ?? 5000,
      idleTimeoutMs: options.idleTimeoutMs ?? 30_000,
      pollIntervalMs: options.pollIntervalMs ?? 500,
      streamProbeIntervalMs: options.streamProbeIntervalMs ?? 10_000,
      streamFailuresBeforePoll: options.streamFailuresBeforePoll ?? 3,
      initialBackoffMs: options.initialBackoffMs ?? 100,
      maxBackoffMs: options.maxBackoffMs ?? 5000,
      pageSize: options.pageSize ?? 1000,
      signalLive: options.signalLive ?? false,
      random: options.random ?? Math.random,
      onModeChange: options.onModeChange ?? (() => undefined),
    };
    const signal = options.signal;
    if (signal !== undefined) {
      if (signal.aborted) {
        this.close();
      } else {
        signal.addEventListener("abort", () => this.close(), { once: true });
      }
    }
  }

  /**
   * The token to save: the position after the last item handed over (or after the last
   * heartbeat or empty poll, which move it on while nothing happens). Empty until the first
   * one when started without a token.
   */
  get token(): string {
    return this.#token;
  }

  /** Whether the feed is being watched (`stream`) or, while watching is unavailable, polled. */
  get mode(): FeedMode {
    return this.#mode;
  }

  /** Whether `close()` was called (or the signal aborted). */
  get closed(): boolean {
    return this.#abort.signal.aborted;
  }

  /** Stops the follower: the open call is cancelled and the iteration ends. */
  close(): void {
    this.#abort.abort();
  }

  [Symbol.asyncIterator](): AsyncIterator<FeedItem> {
    if (this.#iterated) {
      throw new Error("a CustomerFollower can be iterated only once; start another from its token");
    }
    this.#iterated = true;
    return this.#run();
  }

  async *#run(): AsyncGenerator<FeedItem, void, undefined> {
    try {
      while (!this.closed) {
        if (this.#mode === "stream") {
          const end = yield* this.#watch();
          if (end.closed) {
            return;
          }
          if (end.progressed) {
            this.#failures = 0;
          }
          yield* this.#onError(end.error);
        } else {
          if (Date.now() - this.#lastProbe >= this.#settings.streamProbeIntervalMs) {
            this.#lastProbe = Date.now();
            const end = yield* this.#watch();
            if (end.closed) {
              return;
            }
            if (end.opened) {
              // Watching worked again (#watch switched the mode when it opened); the stream
              // has ended since, and its end is handled by the stream's rules.
              yield* this.#onError(end.error);
              continue;
            }
            // A probe that was refused changes nothing; an expired token shows on the poll too.
          }
          yield* this.#poll();
        }
      }
    } finally {
      this.close();
    }
  }

  /**
   * Handles a failed feed call, as the integration service does: relist on an expired or
   * foreign token; while watching, fall back to polling on UNIMPLEMENTED or after
   * `streamFailuresBeforePoll` failures in a row; otherwise back off, then retry.
   */
  async *#onError(error: ConnectError): AsyncGenerator<FeedItem, void, undefined> {
    if (this.closed) {
      return;
    }
    if (error.code === Code.FailedPrecondition && RELIST_REASONS.includes(errorReason(error) ?? "")) {
      yield* this.#relist();
      return;
    }
    if (this.#mode === "stream") {
      if (error.code === Code.Unimplemented) {
        this.#switchToPoll();
        return;
      }
      if (!TRANSIENT.has(error.code)) {
        throw error;
      }
      this.#failures += 1;
      if (this.#failures >= this.#settings.streamFailuresBeforePoll) {
        this.#switchToPoll();
        return;
      }
    } else {
      if (!TRANSIENT.has(error.code)) {
        throw error;
      }
      this.#failures += 1;
    }
    await this.#pause(
      backoffDelay(
        { initialMs: this.#settings.initialBackoffMs, maxMs: this.#settings.maxBackoffMs },
        this.#failures,
        this.#settings.random,
      ),
    );
  }

  /** A watch stream was accepted: while polling, that was a successful probe. */
  #streamOpened(): void {
    if (this.#mode === "poll") {
      this.#mode = "stream";
      this.#failures = 0;
      this.#liveDue = true;
      this.#settings.onModeChange("stream");
    }
  }

  #switchToPoll(): void {
    this.#mode = "poll";
    this.#failures = 0;
    this.#liveDue = true;
    // The stream just failed: probing it again at once would only fail again.
    this.#lastProbe = Date.now();
    this.#settings.onModeChange("poll");
  }

  /** One watch stream from the current token, until it fails, goes silent or is closed. */
  async *#watch(): AsyncGenerator<FeedItem, StreamEnd, undefined> {
    const call = new AbortController();
    let opened = false;
    let progressed = false;
    let silence: string | undefined;
    let timer: NodeJS.Timeout | undefined;
    const arm = (ms: number, why: string) => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        silence = why;
        call.abort();
      }, ms);
    };
    arm(this.#settings.callTimeoutMs, "opening the watch stream timed out");
    this.#liveDue = true;
    try {
      const stream = this.#crm.watchCustomers(
        { resumeToken: this.#token, startPosition: this.#settings.startPosition },
        {
          signal: AbortSignal.any([this.#abort.signal, call.signal]),
          onHeader: (headers) => {
            // A trailers-only response (an immediate error) carries grpc-status in its headers.
            if (!headers.has("grpc-status")) {
              opened = true;
              this.#streamOpened();
              arm(this.#settings.idleTimeoutMs, "no event or heartbeat");
            }
          },
        },
      );
      const idle = `no event or heartbeat for ${this.#settings.idleTimeoutMs} ms`;
      for await (const message of stream) {
        if (!opened) {
          opened = true;
          this.#streamOpened();
        }
        progressed = true;
        // The consumer's time with an item is not the stream's silence.
        clearTimeout(timer);
        switch (message.kind.case) {
          case "event": {
            const item = this.#accept(message.kind.value);
            if (item !== undefined) {
              yield item;
            }
            break;
          }
          case "heartbeat": {
            const item = this.#heartbeat(message.kind.value);
            if (item !== undefined) {
              yield item;
            }
            break;
          }
          default:
            break;
        }
        arm(this.#settings.idleTimeoutMs, idle);
      }
      return {
        closed: false,
        error: new ConnectError("CRM ended the watch stream", Code.Unavailable),
        opened,
        progressed,
      };
    } catch (caught) {
      if (this.closed) {
        return { closed: true };
      }
      const error =
        silence !== undefined
          ? new ConnectError(silence, Code.DeadlineExceeded)
          : ConnectError.from(caught);
      return { closed: false, error, opened, progressed };
    } finally {
      clearTimeout(timer);
      call.abort();
    }
  }

  /** One ListCustomerEvents call, then a pause if it found the follower caught up. */
  async *#poll(): AsyncGenerator<FeedItem, void, undefined> {
    let response;
    try {
      response = await this.#crm.listCustomerEvents(
        {
          resumeToken: this.#token,
          startPosition: this.#settings.startPosition,
          pageSize: this.#settings.pageSize,
        },
        { signal: this.#abort.signal, timeoutMs: this.#settings.callTimeoutMs },
      );
    } catch (caught) {
      if (!this.closed) {
        yield* this.#onError(ConnectError.from(caught));
      }
      return;
    }
    this.#failures = 0;
    for (const event of response.events) {
      const item = this.#accept(event);
      if (item !== undefined) {
        yield item;
      }
      if (this.closed) {
        return;
      }
    }
    if (response.nextSequence >= this.#sequence) {
      this.#sequence = response.nextSequence;
      this.#token = response.nextResumeToken;
    }
    if (response.events.length === 0 && response.remainingEvents === 0n) {
      if (this.#liveDue && this.#settings.signalLive) {
        this.#liveDue = false;
        yield { kind: "live", token: this.#token };
      }
      await this.#pause(this.#settings.pollIntervalMs);
    }
  }

  /**
   * The token can no longer be resumed: hand over every current customer, then continue from
   * the snapshot position of the listing's first page, as the integration service does. That
   * position was taken before the first page was read, so a change made while the listing
   * runs is seen again as an event afterwards rather than missed.
   */
  async *#relist(): AsyncGenerator<FeedItem, void, undefined> {
    let pageToken = "";
    let snapshot: { token: string; sequence: bigint } | undefined;
    // Held back one place, so that the last customer can carry the snapshot's token.
    let held: Customer | undefined;
    for (;;) {
      let page;
      try {
        page = await this.#crm.listCustomers(
          { pageSize: this.#settings.pageSize, pageToken },
          { signal: this.#abort.signal, timeoutMs: this.#settings.callTimeoutMs },
        );
      } catch (caught) {
        const error = ConnectError.from(caught);
        if (this.closed) {
          return;
        }
        if (!TRANSIENT.has(error.code)) {
          throw error;
        }
        // The feed call fails the same way next time, which starts the listing over.
        await this.#pause(this.#settings.maxBackoffMs);
        return;
      }
      snapshot ??= { token: page.resumeToken, sequence: page.resumeSequence };
      for (const customer of page.customers) {
        if (held !== undefined) {
          yield { kind: "relisted", customer: held, token: this.#token };
        }
        held = customer;
      }
      if (page.nextPageToken === "") {
        break;
      }
      pageToken = page.nextPageToken;
    }
    // A new log (another database) numbers its events afresh, so the snapshot's sequence
    // replaces the old one even when it is lower.
    this.#token = snapshot.token;
    this.#sequence = snapshot.sequence;
    this.#liveDue = true;
    if (held !== undefined) {
      yield { kind: "relisted", customer: held, token: this.#token };
    }
  }

  /** The item for `event`, or nothing if it was handed over already. */
  #accept(event: CustomerEvent): FeedItem | undefined {
    if (event.sequence <= this.#sequence) {
      return undefined;
    }
    this.#sequence = event.sequence;
    this.#token = event.resumeToken;
    return { kind: "event", event, token: this.#token };
  }

  /** Moves the token on with a heartbeat; the `live` item, if one is due. */
  #heartbeat(beat: Heartbeat): FeedItem | undefined {
    if (beat.sequence >= this.#sequence) {
      this.#sequence = beat.sequence;
      this.#token = beat.resumeToken;
    }
    // Older CRM versions never set `caught_up`: their heartbeats only move the token.
    if (beat.caughtUp && this.#liveDue && this.#settings.signalLive) {
      this.#liveDue = false;
      return { kind: "live", token: this.#token };
    }
    return undefined;
  }

  /** Waits `ms`, or less if the follower is closed meanwhile. */
  async #pause(ms: number): Promise<void> {
    try {
      await sleep(ms, undefined, { signal: this.#abort.signal });
    } catch {
      // Closed: the caller sees `closed` and stops.
    }
  }
}

/**
 * Follows CRM's customer feed: every change in order, each once, across reconnects, CRM
 * restarts, polling fallbacks and relists.
 *
 * ```ts
 * const follower = followCustomers(crm, { token: await load() });
 * for await (const item of follower) {
 *   if (item.kind === "event") await onChange(item.event);
 *   if (item.kind === "relisted") await reconcile(item.customer);
 *   await save(item.token);
 * }
 * ```
 */
export function followCustomers(crm: CrmClient, options: FollowOptions = {}): CustomerFollower {
  return new CustomerFollower(crm, options);
}
