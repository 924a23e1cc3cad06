/**
 * Confirmation of destructive commands and the usage checks of `mobility cut`, without a
 * server: nothing here needs root.
 */
import t from 'tap';
import { MobilityError } from '../../src/errors.js';
import { confirmDestructive } from '../../src/cli/confirm.js';
import { runCli } from '../helpers.js';

t.test('confirmDestructive: --yes goes ahead, no terminal refuses with MOB_ERR_USAGE after showing the summary', async (t) => {
  const written: string[] = [];
  const write = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string | Uint8Array) => { written.push(String(chunk)); return true; }) as typeof process.stderr.write;
  try {
    await confirmDestructive({ yes: true, command: 'disable', summary: 'deletes X', interactive: false });
    t.same(written, [], '--yes: nothing shown, nothing asked');
    const err = await confirmDestructive({ yes: false, command: 'disable', summary: 'deletes X', interactive: false }).then(() => null, (e: unknown) => e);
    t.ok(err instanceof MobilityError, 'refused');
    t.equal((err as MobilityError).code, 'MOB_ERR_USAGE');
    t.match((err as MobilityError).message, /--yes/);
    t.match((err as MobilityError).message, /nothing was changed/);
    t.same(written, ['deletes X\n'], 'the summary is shown before refusing');
  } finally {
    process.stderr.write = write;
  }
});

t.test('mobility cut and disable: usage errors are coded and reach no server', async (t) => {
  // port 9 on loopback: nothing listens; a usage error must come before any connection attempt
  const conn = ['--server', 'wss://127.0.0.1:9', '--token-file', '/nonexistent', '--ca', '/nonexistent'];
  const noMachine = await runCli(['cut', ...conn]).done;
  t.equal(noMachine.code, 2);
  t.match(noMachine.stderr, /MOB_ERR_USAGE: cut needs --machine/);
  const badKind = await runCli(['cut', ...conn, '--machine', 'm', '--kind', 'full']).done;
  t.equal(badKind.code, 2);
  t.match(badKind.stderr, /MOB_ERR_USAGE: --kind must be crash or app/);
  const badTimeout = await runCli(['cut', ...conn, '--machine', 'm', '--timeout', '10ms']).done;
  t.equal(badTimeout.code, 2);
  t.match(badTimeout.stderr, /MOB_ERR_USAGE: --timeout/);
  const help = await runCli(['cut', '--help']).done;
  t.equal(help.code, 0);
  t.match(help.stdout, /mobility cut --machine M/);
  const dis = await runCli(['disable', '--help']).done;
  t.match(dis.stdout, /--yes/);
  const yesOnEnable = await runCli(['enable', ...conn, '--machine', 'm', '--disk', '/dev/x', '--yes']).done;
  t.equal(yesOnEnable.code, 2, 'enable has no --yes');
});
