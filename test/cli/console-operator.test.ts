/**
 * `mobility operator add|list|remove`: the web console's operators in a real configuration
 * database. The terminal prompt is driven through a real pseudo-terminal (util-linux `script`).
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { CLI_PATH } from '../../src/server/spawn.js';
import { ConfigDb } from '../../src/server/config-db.js';
import { verifyPassword } from '../../src/server/console/passwords.js';
import { cleanup, runCli, tmpDir } from '../helpers.js';

/** The CLI on a pseudo-terminal, its stdin fed `input`. */
function onTerminal(args: string[], input: string): Promise<{ code: number | null; out: string }> {
  const cmd = [process.execPath, CLI_PATH, ...args].map((a) => `'${a.replace(/'/g, "'\\''")}'`).join(' ');
  const child = spawn('script', ['-qec', cmd, '/dev/null'], { stdio: ['pipe', 'pipe', 'pipe'] });
  cleanup().process(child);
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  child.stdin.end(input);
  return new Promise((resolve) => child.once('close', (code) => resolve({ code, out })));
}

async function hashOf(dataDir: string, name: string): Promise<string | null> {
  const db = ConfigDb.open(dataDir);
  try { return db.getOperator(name)?.passwordHash ?? null; } finally { db.close(); }
}

t.test('operator add, list and remove', async (t) => {
  const dir = await tmpDir(t);
  const dataDir = path.join(dir, 'data');
  const pw = path.join(dir, 'pw');
  await fsp.writeFile(pw, 'first password 1\n', { mode: 0o600 });

  // a directory without a server (a mistyped --data-dir) is refused, and not created
  const typo = path.join(dir, 'dta');
  const wrong = await runCli(['operator', 'add', 'alice', '--data-dir', typo, '--password-file', pw]).done;
  t.not(wrong.code, 0, 'a data directory without a server is refused');
  t.match(wrong.stderr, /MOB_ERR_CONFIG.*no Mobility server/);
  t.notOk(fs.existsSync(typo), 'and nothing was created there');
  // the server's data directory (its configuration database)
  ConfigDb.open(dataDir).close();

  const add = await runCli(['operator', 'add', 'alice', '--data-dir', dataDir, '--password-file', pw]).done;
  t.equal(add.code, 0, `add with --password-file ${add.stderr}`);
  t.match(add.stdout, /added operator alice/);
  const h = await hashOf(dataDir, 'alice');
  t.match(h, /^scrypt\$/, 'stored as a scrypt hash');
  t.ok(await verifyPassword('first password 1', h!), 'of the file\'s password');

  const list = await runCli(['operator', 'list', '--data-dir', dataDir, '--json']).done;
  t.equal(list.code, 0);
  t.same((JSON.parse(list.stdout) as { name: string; lastLoginAt: null }[]).map((o) => [o.name, o.lastLoginAt]), [['alice', null]]);
  t.notOk(list.stdout.includes('scrypt'), 'list never shows the hash');

  const noTty = await runCli(['operator', 'add', 'bob', '--data-dir', dataDir]).done;
  t.equal(noTty.code, 2, 'without a terminal and without --password-file: usage error');
  t.match(noTty.stderr, /MOB_ERR_USAGE.*--password-file/);
  await fsp.writeFile(pw, 'short\n');
  const short = await runCli(['operator', 'add', 'bob', '--data-dir', dataDir, '--password-file', pw]).done;
  t.equal(short.code, 2, 'a short password is refused');
  t.match(short.stderr, /at least 10 characters/);
  const badName = await runCli(['operator', 'add', 'a/b', '--data-dir', dataDir, '--password-file', pw]).done;
  t.equal(badName.code, 2, 'a name outside [A-Za-z0-9._-] is refused');
  t.equal(await hashOf(dataDir, 'bob'), null, 'nothing was stored by the refused ones');

  // on a terminal: asked twice, not echoed by the program
  const typed = await onTerminal(['operator', 'add', 'bob', '--data-dir', dataDir], 'terminal password 2\nterminal password 2\n');
  t.equal(typed.code, 0, `add on a terminal ${typed.out}`);
  t.match(typed.out, /password: [\s\S]*password again: [\s\S]*added operator bob/);
  t.ok(await verifyPassword('terminal password 2', (await hashOf(dataDir, 'bob'))!), 'the typed password is stored');
  const differ = await onTerminal(['operator', 'add', 'carl', '--data-dir', dataDir], 'terminal password 2\nterminal password 3\n');
  t.equal(differ.code, 2, 'two different passwords are refused');
  t.match(differ.out, /the two passwords differ/);
  t.equal(await hashOf(dataDir, 'carl'), null);

  // a new password replaces the old
  await fsp.writeFile(pw, 'second password 2\n');
  const again = await runCli(['operator', 'add', 'alice', '--data-dir', dataDir, '--password-file', pw]).done;
  t.equal(again.code, 0);
  t.match(again.stdout, /changed the password of operator alice; its console sessions are ended/);
  t.notOk(await verifyPassword('first password 1', (await hashOf(dataDir, 'alice'))!), 'the old password no longer works');

  const rm = await runCli(['operator', 'remove', 'alice', '--data-dir', dataDir]).done;
  t.equal(rm.code, 0);
  t.equal(await hashOf(dataDir, 'alice'), null, 'removed');
  const rm2 = await runCli(['operator', 'remove', 'alice', '--data-dir', dataDir]).done;
  t.equal(rm2.code, 3, 'removing an unknown operator: MOB_ERR_CONFIG');
  t.match(rm2.stderr, /MOB_ERR_CONFIG: no operator named alice/);
  const help = await runCli(['operator', '--help']).done;
  t.equal(help.code, 0);
  t.match(help.stdout, /mobility operator add NAME/);
});
