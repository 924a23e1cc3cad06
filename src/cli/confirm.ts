/**
 * Confirmation of destructive commands (disable, reprotect). On a terminal (stdin and
 * stderr) the command shows what it will destroy and asks; elsewhere it refuses with
 * MOB_ERR_USAGE unless --yes was given, so a script never deletes data by accident.
 */
import readline from 'node:readline';
import { MobilityError } from '../errors.js';

export interface ConfirmOptions {
  /** --yes was given. */
  yes: boolean;
  /** The command, for messages: "disable", "reprotect". */
  command: string;
  /** What will be destroyed, one or more lines (shown on stderr before asking or refusing). */
  summary: string;
  /** What the command does, for the refusal (default "destroys the data listed above"). */
  consequence?: string;
  /** For tests: whether to treat the session as interactive (default: stdin and stderr are TTYs). */
  interactive?: boolean;
}

export function isInteractive(): boolean {
  return Boolean(process.stdin.isTTY && process.stderr.isTTY);
}

/** Resolves when confirmed; throws MOB_ERR_USAGE (nothing changed) otherwise. */
export async function confirmDestructive(o: ConfirmOptions): Promise<void> {
  if (o.yes) return;
  const interactive = o.interactive ?? isInteractive();
  process.stderr.write(o.summary.endsWith('\n') ? o.summary : o.summary + '\n');
  if (!interactive) {
    throw new MobilityError('MOB_ERR_USAGE', `${o.command} ${o.consequence ?? 'destroys the data listed above'} and this is not a terminal, so it cannot ask: run it again with --yes to confirm (nothing was changed)`);
  }
  const rl = readline.createInterface({ input: process.stdin, output: process.stderr });
  const answer = await new Promise<string | null>((resolve) => {
    rl.once('close', () => resolve(null));
    rl.once('SIGINT', () => { rl.close(); });
    rl.question(`${o.command}: type "yes" to go ahead: `, (a) => resolve(a));
  });
  rl.close();
  if (answer === null || answer.trim().toLowerCase() !== 'yes') {
    if (answer === null) process.stderr.write('\n');
    throw new MobilityError('MOB_ERR_USAGE', `${o.command} was not confirmed (nothing was changed)`);
  }
}
