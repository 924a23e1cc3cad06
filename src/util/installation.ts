/**
 * One agent installation on one machine is known by a digest of its state directory: the
 * registration's installation id and the trace instance's name both derive from it, so two
 * installations (even under one agent name) never collide. Pure: no I/O, cheap to import.
 */
import crypto from 'node:crypto';
import path from 'node:path';

/** 16 hex characters of sha256(absolute state directory). */
export function installIdOf(stateDir: string): string {
  return crypto.createHash('sha256').update(path.resolve(stateDir)).digest('hex').slice(0, 16);
}
