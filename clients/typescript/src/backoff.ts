/**
 * Reconnect delays: exponential, capped, with jitter, so that many followers cut off by the
 * same CRM restart do not all reconnect in the same instant.
 *
 * @module
 */

/** Bounds of the reconnect delay. */
export interface BackoffSettings {
  /** Delay after the first failure, in milliseconds; doubles with each further failure. */
  initialMs: number;
  /** Largest delay, in milliseconds. */
  maxMs: number;
}

/**
 * The delay before the next attempt after `failures` consecutive failures (1 or more).
 *
 * The exponential delay is capped at `maxMs`, then a random share of up to half of it is taken
 * off ("equal jitter"): the delay never falls below half the exponential one, so backing off
 * still backs off, but concurrent clients spread out. `random` returns a number in [0, 1) and
 * is injectable so tests can pin it.
 */
export function backoffDelay(
  settings: BackoffSettings,
  failures: number,
  random: () => number = Math.random,
): number {
  const exponent = Math.min(Math.max(failures - 1, 0), 30);
  const capped = Math.min(settings.initialMs * 2 ** exponent, settings.maxMs);
  return capped / 2 + (capped / 2) * random();
}
