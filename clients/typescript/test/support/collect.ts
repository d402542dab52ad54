/**
 * Runs a follower in the background and records what it hands over, so a test can wait for
 * an outcome (so many events, a mode) without sleeping, and then compare everything at once.
 *
 * @module
 */
import type { CustomerFollower, FeedItem } from "../../src/index.js";
import type { Customer, CustomerEvent } from "../../src/gen/crm/v1/crm_pb.js";

export class Collector {
  /** Every item handed over, in order. */
  readonly items: FeedItem[] = [];
  /** The error the iteration ended with, if it did. */
  error: unknown;
  /** Whether the iteration has ended. */
  finished = false;
  /** Resolves when the iteration has ended, with or without an error. */
  readonly done: Promise<void>;
  private waiters = new Set<() => void>();

  constructor(readonly follower: CustomerFollower) {
    this.done = (async () => {
      try {
        for await (const item of follower) {
          this.items.push(item);
          this.notify();
        }
      } catch (error) {
        this.error = error;
      } finally {
        this.finished = true;
        this.notify();
      }
    })();
  }

  /** Wakes every `until`; also for outside changes such as a mode switch. */
  notify(): void {
    for (const wake of this.waiters) {
      wake();
    }
  }

  /** The `event` items' events. */
  events(): CustomerEvent[] {
    return this.items.flatMap((item) => (item.kind === "event" ? [item.event] : []));
  }

  /** The `relisted` items' customers. */
  relisted(): Customer[] {
    return this.items.flatMap((item) => (item.kind === "relisted" ? [item.customer] : []));
  }

  /** Resolves once `condition` holds; fails after `timeoutMs`, or if the follower ended first. */
  async until(condition: () => boolean, timeoutMs: number, what: string): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      const check = () => {
        if (condition()) {
          finish();
          resolve();
        } else if (this.finished) {
          finish();
          reject(new Error(`the follower ended before ${what}: ${String(this.error)}`));
        }
      };
      const timer = setTimeout(() => {
        finish();
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; have ${this.summary()}`));
      }, timeoutMs);
      const finish = () => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      this.waiters.add(check);
      check();
    });
  }

  /** The items so far, one short word each, for failure messages. */
  summary(): string {
    return JSON.stringify(
      this.items.map((item) =>
        item.kind === "event"
          ? `event ${item.event.sequence} ${item.event.customer?.email}`
          : item.kind === "relisted"
            ? `relisted ${item.customer.email}`
            : "live",
      ),
    );
  }
}
