/**
 * Prometheus metrics of one process server (GET /metrics, see docs/operations.md "Metrics").
 *
 * Every server has its own prom-client registry (never the global default one), so several
 * servers in one process (tests) do not share or collide on metrics.
 *
 * Most values already live somewhere in the server and are read when Prometheus scrapes, in
 * collect() callbacks: the per-disk gauges come from the same status the API answers
 * (collectStatus: health reports, the replica listing, the point catalogs), taken once per
 * scrape; the server-wide counters from ProcessServer.stats; bytes written to the target from
 * the disk leases (open stores' bytesWritten plus what closed stores had written). Only what
 * nothing else counts is counted here, by the sessions through the narrow SessionMetrics
 * interface: frames by type, bytes per disk, target write latency, cut freeze times, errors.
 *
 * Labels carry agent and disk ids (checked against ID_PATTERN before a session gets them),
 * error codes, frame types, states and store kinds: never a token, a credential or a reason
 * text. An agent-reported state that does not look like one becomes "other".
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { AGENT_VERSION, PROTOCOL_VERSION } from '../constants.js';
import type { Logger } from '../log.js';
import type { TargetOpStats } from '../target/replica-store.js';
import type { DiskStatus } from './disk-status.js';

/** What a replication session reports (replication-session.ts knows nothing of Prometheus). */
export interface SessionMetrics {
  /** A message received: its decoded frame type, or 'invalid' when it did not decode. */
  frame(type: string): void;
  /** A data frame accepted for a disk: bytes on the wire, decoded data bytes (whole blocks, changed pages), bytes sent as zero flags. */
  data(agentId: string, diskId: string, wireBytes: number, dataBytes: number, zeroBytes: number): void;
  /** Seconds from handing a frame's writes to the replica store until it reported them durable. */
  targetWrite(seconds: number): void;
  /** A cut report (Cut frame): how long the agent kept the disks frozen. */
  cutFrozen(agentId: string, diskIds: string[], frozenMs: number): void;
  /** A session ended with a coded error; agentId and diskIds once the Hello was accepted as far as naming them. */
  sessionError(code: string, agentId: string | null, diskIds: string[]): void;
  /** A coded error of one disk that did not end the session (a refused recovery point). */
  diskError(agentId: string, diskId: string, code: string): void;
}

/** Where the collect() callbacks read from (the composition root, process-server.ts, wires it). */
export interface MetricsSource {
  log: Logger;
  /** Per-disk status, as GET /v1/status answers it. */
  status(): Promise<DiskStatus[]>;
  stats: { sessions: number; rejected: number; bytesReceived: number; points: number; pruned: number; unverified: number };
  /** Replication sessions open now. */
  openSessions(): number;
  /** Agents with a control connection now. */
  controlConnections(): number;
  /** The replica store's kind ('file', 'azure'). */
  targetKind(): string;
  /** false while the store's last listing failed; null before any listing finished. */
  targetAvailable(): boolean | null;
  /** Requests the store made, when it counts them (the azure store). */
  targetOps(): TargetOpStats | undefined;
  /** Bytes written to the target per disk key "agent/disk" since the server started. */
  bytesWritten(): Map<string, number>;
}

/** Every state status can show; each disk gets one sample per state, 1 for its current state. */
export const DISK_STATES = ['initial-sync', 'continuous', 'resync-required', 'resyncing', 'error', 'disconnected', 'target-unavailable', 'failed-over'] as const;
const STATE_SHAPE = /^[a-z][a-z0-9-]{0,31}$/;

const FREEZE_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];
const WRITE_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

type DiskLabel = 'agent' | 'disk';
const DISK_LABELS: DiskLabel[] = ['agent', 'disk'];

function splitKey(key: string): { agent: string; disk: string } {
  const i = key.indexOf('/');
  return { agent: key.slice(0, i), disk: key.slice(i + 1) };
}

export class ServerMetrics implements SessionMetrics {
  readonly registry = new Registry();
  /** The status taken for the scrape in progress. */
  private disks: DiskStatus[] = [];
  private statusOk = true;
  /** Scrapes run one at a time: each renders the status it took. */
  private scrapes: Promise<unknown> = Promise.resolve();

  private readonly frames: Counter<'type'>;
  private readonly diskReceived: Counter<DiskLabel>;
  private readonly diskData: Counter<DiskLabel>;
  private readonly diskZero: Counter<DiskLabel>;
  private readonly diskErrors: Counter<DiskLabel | 'code'>;
  private readonly sessionErrors: Counter<'code'>;
  private readonly freeze: Histogram<DiskLabel>;
  private readonly writeLatency: Histogram<'kind'>;

  constructor(private readonly src: MetricsSource) {
    const registers = [this.registry];
    // process_* and nodejs_*: CPU, memory, heap, event loop lag, GC, handles (names as every Node service has them)
    collectDefaultMetrics({ register: this.registry });
    const self = this;

    new Gauge({
      name: 'mobility_build_info', help: 'Version of this server (value 1).', labelNames: ['version', 'protocol'], registers,
      collect() { this.reset(); this.set({ version: AGENT_VERSION, protocol: String(PROTOCOL_VERSION) }, 1); },
    });

    // ---- per disk, from status (health reports, replica listing, point catalogs) ----
    const diskGauge = (name: string, help: string, value: (d: DiskStatus) => number | null) => new Gauge({
      name, help, labelNames: DISK_LABELS, registers,
      collect() {
        this.reset();
        for (const d of self.disks) {
          const v = value(d);
          if (v !== null && Number.isFinite(v)) this.set({ agent: d.agent, disk: d.disk }, v);
        }
      },
    });
    new Gauge({
      name: 'mobility_disk_state', help: 'State of the disk as mobility status shows it: 1 for the current state, 0 for the others.',
      labelNames: ['agent', 'disk', 'state'], registers,
      collect() {
        this.reset();
        for (const d of self.disks) {
          const current = STATE_SHAPE.test(d.state) ? d.state : 'other';
          for (const s of DISK_STATES) this.set({ agent: d.agent, disk: d.disk, state: s }, s === current ? 1 : 0);
          if (!(DISK_STATES as readonly string[]).includes(current)) this.set({ agent: d.agent, disk: d.disk, state: current }, 1);
        }
      },
    });
    diskGauge('mobility_disk_size_bytes', 'Size of the replicated disk.', (d) => (d.sizeBytes > 0 ? d.sizeBytes : null));
    diskGauge('mobility_disk_initial_complete', '1 once the disk\'s initial replication completed.', (d) => (d.initialComplete ? 1 : 0));
    diskGauge('mobility_disk_rpo_seconds', 'Age of the disk\'s newest recovery point (absent while it has none).', (d) => (d.rpoMs === null ? null : d.rpoMs / 1000));
    diskGauge('mobility_disk_rpo_threshold_seconds', 'RPO alert threshold that applies to the disk (its machine\'s policy, else the server default).', (d) => d.rpoAlertMs / 1000);
    diskGauge('mobility_disk_rpo_alert', '1 when the disk has no recovery point or its newest is older than the threshold.', (d) => (d.rpoAlert ? 1 : 0));
    diskGauge('mobility_disk_newest_point_timestamp_seconds', 'When the disk\'s newest recovery point was taken (Unix time; absent while it has none).', (d) => (d.latestPointAt === null ? null : Date.parse(d.latestPointAt) / 1000));
    diskGauge('mobility_disk_recovery_points', 'Recovery points that include the disk.', (d) => d.points);
    diskGauge('mobility_disk_stored_bytes', 'Bytes the replica and its points occupy in the target (absent until counted).', (d) => d.storedBytes);
    diskGauge('mobility_disk_data_lag_seconds', 'Data lag the agent last reported: age of the oldest change not yet durable on the server.', (d) => (d.dataLagMs === null ? null : d.dataLagMs / 1000));
    diskGauge('mobility_disk_backlog_bytes', 'Changed bytes the agent last reported as not yet shipped.', (d) => d.backlogBytes);
    diskGauge('mobility_disk_churn_bytes_per_second', 'Write rate of the protected disk the agent last reported.', (d) => d.churnBytesPerSec);
    diskGauge('mobility_disk_scan_progress_ratio', 'Progress of the running scan (initial sync or resync), 0 to 1, as last reported.', (d) => (d.progressPermille === null ? null : d.progressPermille / 1000));
    diskGauge('mobility_disk_freeze_failures', 'Freeze failures the agent last reported for the disk.', (d) => (d.healthAgeMs === null ? null : d.freezeFailures));
    diskGauge('mobility_disk_last_freeze_seconds', 'Duration of the disk\'s last freeze, as last reported by the agent.', (d) => (d.lastFreezeMs === null ? null : d.lastFreezeMs / 1000));
    diskGauge('mobility_disk_health_age_seconds', 'Age of the agent\'s last health report for the disk (absent when none was received since the server started).', (d) => (d.healthAgeMs === null ? null : d.healthAgeMs / 1000));
    diskGauge('mobility_disk_connected', '1 while the agent\'s session for the disk is connected.', (d) => (d.connected ? 1 : 0));
    new Counter({
      name: 'mobility_disk_target_written_bytes_total', help: 'Bytes written to the disk\'s replica in the target (image file or page blob; not the write-ahead log or undo journals) since the server started.',
      labelNames: DISK_LABELS, registers,
      collect() {
        this.reset();
        for (const [key, n] of src.bytesWritten()) this.inc(splitKey(key), n);
      },
    });

    // ---- per disk, counted here ----
    this.diskReceived = new Counter({ name: 'mobility_disk_received_bytes_total', help: 'Bytes of data frames received for the disk, as on the wire (compressed).', labelNames: DISK_LABELS, registers });
    this.diskData = new Counter({ name: 'mobility_disk_shipped_bytes_total', help: 'Disk bytes the received data frames carried, decoded: whole blocks and changed pages (zero blocks not counted).', labelNames: DISK_LABELS, registers });
    this.diskZero = new Counter({ name: 'mobility_disk_zero_bytes_total', help: 'Disk bytes received as zero-block flags (no payload).', labelNames: DISK_LABELS, registers });
    this.diskErrors = new Counter({ name: 'mobility_disk_errors_total', help: 'Coded errors that ended a session of the disk or refused its recovery point, by code.', labelNames: ['agent', 'disk', 'code'], registers });
    this.freeze = new Histogram({ name: 'mobility_disk_cut_freeze_seconds', help: 'How long the disk was frozen for a consistency cut, from the agents\' cut reports.', labelNames: DISK_LABELS, buckets: FREEZE_BUCKETS, registers });

    // ---- per server ----
    new Gauge({ name: 'mobility_sessions', help: 'Replication sessions open now.', registers, collect() { this.set(src.openSessions()); } });
    new Gauge({ name: 'mobility_control_connections', help: 'Agents with a control connection now.', registers, collect() { this.set(src.controlConnections()); } });
    const statCounter = (name: string, help: string, value: () => number) => new Counter({
      name, help, registers, collect() { this.reset(); this.inc(value()); },
    });
    statCounter('mobility_sessions_opened_total', 'Replication connections accepted (each WebSocket upgrade of /v1/replicate).', () => src.stats.sessions);
    statCounter('mobility_connections_rejected_total', 'Replication and control connections refused at authentication.', () => src.stats.rejected);
    statCounter('mobility_received_bytes_total', 'Bytes of every message received on replication sessions.', () => src.stats.bytesReceived);
    statCounter('mobility_recovery_points_recorded_total', 'Recovery points recorded.', () => src.stats.points);
    statCounter('mobility_recovery_points_pruned_total', 'Recovery points pruned past retention.', () => src.stats.pruned);
    statCounter('mobility_recovery_points_refused_total', 'Cuts refused because the replica did not match the source\'s sampled pages (MOB_ERR_POINT_UNVERIFIED).', () => src.stats.unverified);
    this.frames = new Counter({ name: 'mobility_received_frames_total', help: 'Messages received on replication sessions, by frame type (invalid: did not decode).', labelNames: ['type'], registers });
    this.sessionErrors = new Counter({ name: 'mobility_session_errors_total', help: 'Replication sessions ended by a coded error (server shutdown not counted), by code.', labelNames: ['code'], registers });
    this.writeLatency = new Histogram({
      name: 'mobility_target_write_seconds', help: 'Time from handing a data frame\'s writes to the replica store until it reported them durable (includes waiting for the batch ahead), by store kind.',
      labelNames: ['kind'], buckets: WRITE_BUCKETS, registers,
    });
    new Gauge({
      name: 'mobility_target_up', help: '1 when the replica store\'s last listing succeeded, 0 when it failed.', labelNames: ['kind'], registers,
      collect() {
        this.reset();
        const up = src.targetAvailable();
        if (up !== null) this.set({ kind: src.targetKind() }, up ? 1 : 0);
      },
    });
    new Counter({
      name: 'mobility_target_requests_total', help: 'Requests sent to the replica store, by operation (each try counts; stores that make requests only).', labelNames: ['kind', 'op'], registers,
      collect() {
        this.reset();
        const s = src.targetOps();
        if (s) for (const [op, n] of Object.entries(s.calls)) this.inc({ kind: src.targetKind(), op }, n);
      },
    });
    const opCounter = (name: string, help: string, value: (s: TargetOpStats) => number) => new Counter({
      name, help, labelNames: ['kind'], registers,
      collect() {
        this.reset();
        const s = src.targetOps();
        if (s) this.inc({ kind: src.targetKind() }, value(s));
      },
    });
    opCounter('mobility_target_request_retries_total', 'Requests to the replica store that failed transiently and were retried.', (s) => s.retries);
    opCounter('mobility_target_uploaded_bytes_total', 'Bytes uploaded to the replica store.', (s) => s.bytesUploaded);
    opCounter('mobility_target_downloaded_bytes_total', 'Bytes downloaded from the replica store.', (s) => s.bytesDownloaded);
    new Gauge({
      name: 'mobility_status_collect_success', help: '1 when this scrape could collect the per-disk status, 0 when it failed (the mobility_disk_* gauges are then absent).', registers,
      collect() { this.set(self.statusOk ? 1 : 0); },
    });
  }

  /** The text exposition of every metric, with the per-disk status taken now. Scrapes run one at a time. */
  render(): Promise<string> {
    const run = this.scrapes.then(async () => {
      try {
        this.disks = await this.src.status();
        this.statusOk = true;
      } catch (err) {
        this.src.log.warn('metrics: could not collect the disks\' status', { error: (err as Error).message });
        this.disks = [];
        this.statusOk = false;
      }
      try {
        return await this.registry.metrics();
      } finally {
        this.disks = [];
      }
    });
    this.scrapes = run.catch(() => undefined);
    return run;
  }

  get contentType(): string { return this.registry.contentType; }

  // ---- SessionMetrics ----
  frame(type: string): void { this.frames.inc({ type }); }

  data(agent: string, disk: string, wireBytes: number, dataBytes: number, zeroBytes: number): void {
    const labels = { agent, disk };
    this.diskReceived.inc(labels, wireBytes);
    this.diskData.inc(labels, dataBytes);
    this.diskZero.inc(labels, zeroBytes);
  }

  targetWrite(seconds: number): void { this.writeLatency.observe({ kind: this.src.targetKind() }, seconds); }

  cutFrozen(agent: string, diskIds: string[], frozenMs: number): void {
    if (!Number.isFinite(frozenMs) || frozenMs < 0) return;
    for (const disk of diskIds) this.freeze.observe({ agent, disk }, frozenMs / 1000);
  }

  sessionError(code: string, agent: string | null, diskIds: string[]): void {
    this.sessionErrors.inc({ code });
    if (agent) for (const disk of diskIds) this.diskErrors.inc({ agent, disk, code });
  }

  diskError(agent: string, disk: string, code: string): void { this.diskErrors.inc({ agent, disk, code }); }
}
