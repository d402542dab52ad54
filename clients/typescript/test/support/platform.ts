/**
 * Real platform processes for the tests: the prebuilt `mip` binary ($MIP_BIN, or the
 * workspace's target/debug/mip) on loopback ports, each with a temporary data directory,
 * all killed when the test process exits, even after a failure.
 *
 * @module
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import {
  createCrmClient,
  createHealthClient,
  createPlatformTransport,
  type CrmClient,
} from "../../src/index.js";
import { HealthCheckResponse_ServingStatus } from "../../src/gen/health/v1/health_pb.js";

/** The repository root, from dist/test/support/ (compiled) or test/support/ (sources). */
const ROOT = fileURLToPath(new URL("../../../../../", import.meta.url));

/** The `mip` binary under test. */
export const MIP = process.env.MIP_BIN ?? join(ROOT, "target", "debug", "mip");

/** Longest a process may take to start listening or to exit. */
const START_TIMEOUT_MS = 20_000;

const running = new Set<ChildProcess>();
function killAll(): void {
  for (const child of running) {
    child.kill("SIGKILL");
  }
}
process.on("exit", killAll);
// A signal ends the process without "exit" handlers: kill the children first.
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  process.once(signal, () => {
    killAll();
    process.exit(128 + (signal === "SIGINT" ? 2 : signal === "SIGTERM" ? 15 : 1));
  });
}

/** A fresh data directory, removed when the test process exits. */
export function tempDataDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "mip-ts-"));
  process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** One `mip crm` process. */
export class CrmProcess {
  private constructor(
    /** The process itself. */
    private readonly child: ChildProcess,
    /** `127.0.0.1:PORT` it listens on. */
    readonly address: string,
    /** Its data directory, kept across restarts. */
    readonly dataDir: string,
  ) {}

  /**
   * Starts CRM with `flags` on `port` (0: a free one, chosen by the process itself) and waits
   * until it says it listens and its health check answers SERVING.
   */
  static async start(flags: string[], dataDir: string, port = 0): Promise<CrmProcess> {
    const child = spawn(
      MIP,
      ["crm", "--listen", `127.0.0.1:${port}`, "--data-dir", dataDir, "--log-format", "json", ...flags],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    running.add(child);
    child.once("exit", () => running.delete(child));
    const output: string[] = [];
    const address = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`mip crm did not listen within ${START_TIMEOUT_MS} ms: ${output.join("")}`)),
        START_TIMEOUT_MS,
      );
      child.once("exit", (code) => {
        clearTimeout(timer);
        reject(new Error(`mip crm exited with ${code} before listening: ${output.join("")}`));
      });
      const onLine = (line: string) => {
        if (output.length < 200) {
          output.push(line);
        }
        try {
          const record = JSON.parse(line) as { fields?: { message?: string; addr?: string } };
          if (record.fields?.message?.startsWith("CRM listening") && record.fields.addr) {
            clearTimeout(timer);
            resolve(record.fields.addr);
          }
        } catch {
          // Not a log record; kept in `output` for the error message.
        }
      };
      // The log goes to stderr; read stdout too, so neither pipe fills up and blocks it.
      createInterface({ input: child.stderr! }).on("line", onLine);
      createInterface({ input: child.stdout! }).on("line", onLine);
    });
    const crm = new CrmProcess(child, address, dataDir);
    await crm.waitServing();
    return crm;
  }

  /** A client of this CRM; it reconnects by itself when the process is restarted. */
  client(): CrmClient {
    return createCrmClient(createPlatformTransport(this.address));
  }

  /** The same CRM again, on the same port and data directory, with `flags`. */
  restart(flags: string[]): Promise<CrmProcess> {
    return CrmProcess.start(flags, this.dataDir, Number(this.address.split(":")[1]));
  }

  /** Kills the process at once (SIGKILL: no draining, streams are cut) and waits for it to exit. */
  async kill(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) {
      return;
    }
    const exited = new Promise((resolve) => this.child.once("exit", resolve));
    this.child.kill("SIGKILL");
    await exited;
  }

  /** The health check answers SERVING, retried briefly while the server finishes starting. */
  private async waitServing(): Promise<void> {
    const health = createHealthClient(createPlatformTransport(this.address));
    const deadline = Date.now() + START_TIMEOUT_MS;
    for (;;) {
      try {
        const response = await health.check({ service: "crm.v1.CrmService" }, { timeoutMs: 1000 });
        if (response.status === HealthCheckResponse_ServingStatus.SERVING) {
          return;
        }
      } catch (error) {
        if (Date.now() > deadline) {
          throw error;
        }
      }
      if (Date.now() > deadline) {
        throw new Error(`CRM at ${this.address} did not become SERVING`);
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
}
