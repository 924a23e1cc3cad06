/**
 * The replication policy as the server pushes it to an agent (control channel `assignments`),
 * and how the agent reads it. Shared by the daemon's own protection and its VMs' (host mode).
 */
import type { CompressMode } from '../protocol/block-codec.js';

export interface AgentPolicy {
  name: string; crashIntervalMs: number; appIntervalMs: number; compress: boolean; bandwidthBytes: number;
  /** Absent from older servers: then compress true means auto. */
  compressMode?: CompressMode;
  /** Absent from servers older than the setting: the protector's default. */
  freezeLimitMs?: number; spoolBudgetBytes?: number;
}

/** The compress mode a policy asks for: compressMode from newer servers (an unknown one counts as auto), else compress true = auto. */
export function policyCompressMode(p: Pick<AgentPolicy, 'compress' | 'compressMode'>): CompressMode {
  const m = p.compressMode as string | undefined;
  if (m === 'auto' || m === 'always' || m === 'never') return m;
  if (m !== undefined) return 'auto';
  return p.compress ? 'auto' : 'never';
}

/** What of a policy the protector uses: a change of it restarts protection. */
export function policyKey(p: AgentPolicy): unknown[] {
  return [p.crashIntervalMs, p.appIntervalMs, policyCompressMode(p), p.bandwidthBytes, p.freezeLimitMs ?? null, p.spoolBudgetBytes ?? null];
}
