/** One disk as /v1/status reports it (the HTTP API, the metrics and the CLI read this shape). */
export interface DiskStatus {
  agent: string; disk: string; sizeBytes: number; initialComplete: boolean;
  state: string; reason: string; connected: boolean; healthAgeMs: number | null;
  rpoMs: number | null;
  /** The RPO alert threshold that applies to this disk: its machine's policy, else the server's default (the top-level rpoAlertMs). */
  rpoAlertMs: number;
  /** No recovery point yet, or the newest is older than rpoAlertMs. */
  rpoAlert: boolean;
  latestPoint: string | null; latestAppPoint: string | null; points: number;
  /** When the newest point was taken (ISO 8601, the agent's clock at the freeze); null without a point. */
  latestPointAt: string | null;
  /** Bytes the replica and its points occupy in the target; null while the store has not counted them yet. */
  storedBytes: number | null;
  dataLagMs: number | null; backlogBytes: number | null; churnBytesPerSec: number | null; freezeFailures: number; lastFreezeMs: number | null;
  /** Progress of the running scan (initial sync or resync), 0..1000, from the agent's last health report. */
  progressPermille: number | null;
}
