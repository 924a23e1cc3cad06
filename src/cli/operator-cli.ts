/**
 * `mobility operator add|list|remove`: the operators of the web console, kept in the server's
 * configuration database (DATA-DIR/config.db) as salted scrypt hashes. Runs on the server
 * machine against its data directory (like push-account); a running server sees changes at once.
 */
import readline from 'node:readline';
import { Writable } from 'node:stream';
import fs from 'node:fs';
import path from 'node:path';
import { ID_PATTERN } from '../constants.js';
import { MobilityError } from '../errors.js';
import { EXIT, parse, readSecretFile, type Values } from './args.js';
import { isInteractive } from './confirm.js';
import { table } from './progress.js';

export const OPERATOR_HELP = `Usage:
  mobility operator add NAME [--password-file F] [--data-dir DIR]
  mobility operator list [--data-dir DIR] [--json]
  mobility operator remove NAME [--data-dir DIR]

Operators log in to the web console (https://SERVER:PORT/console/). add asks for the password
twice on the terminal (never echoed), or reads it from --password-file (the file's first line;
needed when not on a terminal); at least 10 characters. Adding an existing name sets a new
password and ends that operator's open sessions; remove deletes the operator and ends its
sessions. The password is stored as a salted scrypt hash in DATA-DIR/config.db (mode 0600).
  --data-dir DIR   the server's data directory (default ./mobility-data)
`;

/** Asks each prompt in turn on the terminal and reads the answers without echoing them (one reader for all: typed-ahead lines are kept). */
async function askHidden(prompts: string[]): Promise<string[]> {
  let muted = false;
  const out = new Writable({
    write(chunk: Buffer, _enc, cb) {
      if (!muted) process.stderr.write(chunk);
      cb();
    },
  });
  const rl = readline.createInterface({ input: process.stdin, output: out, terminal: true });
  const answers: string[] = [];
  try {
    const closed = new Promise<never>((_, reject) => rl.once('close', () => reject(new MobilityError('MOB_ERR_USAGE', 'no password was given (nothing was changed)'))));
    closed.catch(() => undefined);
    rl.once('SIGINT', () => rl.close());
    // lines typed ahead (or arriving together) are queued, not lost between two prompts
    const queued: string[] = [];
    let waiter: ((line: string) => void) | null = null;
    rl.on('line', (line) => {
      if (waiter) { const w = waiter; waiter = null; w(line); } else queued.push(line);
    });
    for (const prompt of prompts) {
      process.stderr.write(prompt);
      muted = true;
      const next = queued.shift();
      answers.push(next !== undefined ? next : await Promise.race([new Promise<string>((resolve) => { waiter = resolve; }), closed]));
      muted = false;
      process.stderr.write('\n');
    }
    return answers;
  } finally {
    muted = false;
    rl.removeAllListeners('close');
    rl.close();
  }
}

async function passwordOf(v: Values): Promise<string> {
  if (v['password-file']) return (await readSecretFile(v['password-file'] as string, 'password-file')).split('\n')[0];
  if (!isInteractive()) throw new MobilityError('MOB_ERR_USAGE', 'not on a terminal, so the password cannot be asked: give --password-file F (nothing was changed)');
  const [a, b] = await askHidden(['password: ', 'password again: ']);
  if (a !== b) throw new MobilityError('MOB_ERR_USAGE', 'the two passwords differ (nothing was changed)');
  return a;
}

export async function runOperator(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  const { values: v, positionals } = parse(rest, { 'data-dir': { type: 'string' }, 'password-file': { type: 'string' }, json: { type: 'boolean' } }, true);
  if (v.help) { process.stdout.write(OPERATOR_HELP); return EXIT.OK; }
  if (!['add', 'list', 'remove'].includes(sub ?? '')) { process.stdout.write(OPERATOR_HELP); return EXIT.USAGE; }
  const name = positionals[0];
  if (sub !== 'list') {
    if (!name || positionals.length > 1) throw new MobilityError('MOB_ERR_USAGE', `mobility operator ${sub} takes one NAME`);
    if (!ID_PATTERN.test(name)) throw new MobilityError('MOB_ERR_USAGE', `operator name ${JSON.stringify(name)} is not [A-Za-z0-9._-]{1,64}`);
  }
  const dataDir = path.resolve((v['data-dir'] as string | undefined) ?? 'mobility-data');
  // operators belong to a server: a mistyped --data-dir must not create an empty one beside it
  if (!fs.existsSync(path.join(dataDir, 'config.db'))) {
    throw new MobilityError('MOB_ERR_CONFIG', `${dataDir} holds no Mobility server (no config.db): give the server's --data-dir (nothing was created)`);
  }
  // the password is read (and checked) before the database is opened: a refused one changes nothing
  let hash: string | null = null;
  if (sub === 'add') {
    const { hashPassword } = await import('../server/console/passwords.js');
    hash = await hashPassword(await passwordOf(v));
  }
  const { ConfigDb } = await import('../server/config-db.js');
  const db = ConfigDb.open(dataDir);
  try {
    if (sub === 'list') {
      const rows = db.listOperators();
      if (v.json) process.stdout.write(JSON.stringify(rows.map((r) => ({ name: r.name, createdAt: new Date(r.createdAt).toISOString(), lastLoginAt: r.lastLoginAt === null ? null : new Date(r.lastLoginAt).toISOString() })), null, 1) + '\n');
      else process.stdout.write(rows.length ? table([['NAME', 'CREATED', 'LAST LOGIN'], ...rows.map((r) => [r.name, new Date(r.createdAt).toISOString(), r.lastLoginAt === null ? '-' : new Date(r.lastLoginAt).toISOString()])]) : 'no operators (mobility operator add NAME)\n');
    } else if (sub === 'remove') {
      if (!db.removeOperator(name)) throw new MobilityError('MOB_ERR_CONFIG', `no operator named ${name} (mobility operator list)`);
      process.stdout.write(`removed operator ${name}; its console sessions are ended\n`);
    } else {
      const r = db.putOperator(name, hash!);
      process.stdout.write(r === 'created' ? `added operator ${name}: log in at https://<server>:<port>/console/\n` : `changed the password of operator ${name}; its console sessions are ended\n`);
    }
  } finally {
    db.close();
  }
  return EXIT.OK;
}
