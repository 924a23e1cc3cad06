/**
 * The pull-install bundle and its scripts, run for real: `scripts/package.sh`
 * builds the bundle once, the tests unpack it and run install.sh and
 * uninstall.sh as child processes against empty temporary prefixes. The steps
 * that need the real commands (with a stub CLI) are in install-stub.test.ts.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { GOLDEN_DIR, ROOT, SERVER, VERSION, lastLine, listing, makeBundle, run } from './bundle-harness.js';

const { work, pkg, packMs, tarball, BUNDLE, INSTALL, UNINSTALL, emptyPrefix } = await makeBundle();

t.test('package.sh writes a self-contained bundle', async (t) => {
  t.match(pkg.stdout, new RegExp(`bundle: .*${path.basename(tarball).replace(/\./g, '\\.')}`), 'prints the bundle path');
  t.match(pkg.stdout, /size: +\d+ bytes/, 'prints the bundle size');
  t.comment(`packaged in ${packMs} ms, ${(fs.statSync(tarball).size / 1048576).toFixed(1)} MiB`);
  t.same((await fsp.readdir(path.join(work, 'unpacked'))), [`mobility-agent-${VERSION}`], 'one top directory named for the version');
  const top = (await fsp.readdir(BUNDLE)).sort();
  t.same(top, ['VERSION', 'bin', 'dist', 'install.sh', 'mobility-agent.service.in', 'node_modules', 'package-lock.json', 'package.json', 'proto', 'uninstall.sh']);
  t.equal((await fsp.readFile(path.join(BUNDLE, 'VERSION'), 'utf8')).trim(), VERSION);
  t.same(await fsp.readdir(path.join(BUNDLE, 'dist')), ['src'], 'dist holds src only (no test, no bench)');
  t.ok(fs.existsSync(path.join(BUNDLE, 'dist', 'src', 'cli', 'main.js')), 'the CLI entry is there');
  const nonJs = (await listing(path.join(BUNDLE, 'dist'))).filter((l) => l.startsWith('f ') && !l.endsWith('.js'));
  t.same(nonJs, [], 'built JS only (no maps, no sources)');
  for (const dev of ['tap', 'typescript', '@types/node']) t.notOk(fs.existsSync(path.join(BUNDLE, 'node_modules', dev)), `no dev dependency ${dev}`);
  for (const prod of ['ws', 'lz4', 'better-sqlite3', 'protobufjs']) t.ok(fs.existsSync(path.join(BUNDLE, 'node_modules', prod)), `production dependency ${prod}`);
  t.equal(fs.statSync(path.join(BUNDLE, 'install.sh')).mode & 0o777, 0o755, 'install.sh is executable');
  t.equal(fs.statSync(path.join(BUNDLE, 'bin', 'mobility.js')).mode & 0o777, 0o755, 'bin/mobility.js is executable');
  const owners = spawnSync('tar', ['-tvzf', tarball, '--numeric-owner'], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean);
  t.same(owners.filter((l) => !/^\S+ 0\/0 /.test(l)), [], 'every entry is owned by 0/0');
  // the bundle's own dependencies load with this node (native modules included)
  const load = spawnSync(process.execPath, ['-e', "require('lz4'); new (require('better-sqlite3'))(':memory:').close(); require('ws')"], { cwd: BUNDLE, encoding: 'utf8' });
  t.equal(load.status, 0, `native modules load from the bundle (${load.stderr})`);
});

t.test('both scripts parse (bash -n; shellcheck when installed)', async (t) => {
  for (const f of [INSTALL, UNINSTALL, path.join(ROOT, 'scripts', 'package.sh')]) {
    const r = await run('bash', ['-n', f]);
    t.equal(r.code, 0, `bash -n ${path.basename(f)} ${r.stderr}`);
  }
  const sc = spawnSync('shellcheck', ['--version'], { encoding: 'utf8' });
  if (sc.error || sc.status !== 0) { t.comment('shellcheck is not installed: skipped'); return; }
  for (const f of [INSTALL, UNINSTALL, path.join(ROOT, 'scripts', 'package.sh')]) {
    const r = await run('shellcheck', ['-S', 'warning', f]);
    t.equal(r.code, 0, `shellcheck ${path.basename(f)}\n${r.stdout}`);
  }
});

t.test('dry run prints the plan and changes nothing (golden)', async (t) => {
  const prefix = await emptyPrefix();
  const r = await run(INSTALL, ['--dry-run', '--server', SERVER, '--passphrase-file', '/root/pass', '--prefix', prefix]);
  t.equal(r.code, 0, r.stderr);
  const normal = r.stdout
    .split(prefix).join('<PREFIX>')
    .split(VERSION).join('<VERSION>')
    .replace(/\(found: [^)]*\)/g, '(found: <NODE>)');
  const golden = path.join(GOLDEN_DIR, 'install-dry-run.txt');
  if (process.env.UPDATE_GOLDEN === '1') await fsp.writeFile(golden, normal);
  t.equal(normal, await fsp.readFile(golden, 'utf8'), 'plan equals test/install/golden/install-dry-run.txt (UPDATE_GOLDEN=1 rewrites it)');
  t.equal(lastLine(r.stdout), `MOBILITY-INSTALL dry-run ${VERSION}`);
  t.same(await fsp.readdir(prefix), [], 'the prefix is still empty');

  const again = await run(INSTALL, ['--dry-run', '--server', SERVER, '--passphrase-file', '/root/pass', '--prefix', prefix]);
  t.equal(again.stdout, r.stdout, 'deterministic');

  const noServer = await run(INSTALL, ['--dry-run', '--passphrase-file', '/root/pass', '--prefix', prefix]);
  t.equal(noServer.code, 2, 'a missing --server is a usage error');
  t.match(noServer.stderr, /--server is required/);
  t.match(lastLine(noServer.stdout), /^MOBILITY-INSTALL fail MOB_ERR_USAGE --server is required/);
  t.same(await fsp.readdir(prefix), [], 'the prefix is still empty');
});

t.test('usage errors exit 2 with a message', async (t) => {
  const prefix = await emptyPrefix();
  const base = ['--server', SERVER, '--prefix', prefix, '--skip-preflight', '--no-start'];
  const cases: [string, string[], RegExp][] = [
    ['unknown option', [...base, '--no-register', '--frobnicate'], /unknown option: --frobnicate/],
    ['both secret files', [...base, '--passphrase-file', '/root/pass', '--token-file', '/root/token'], /mutually exclusive/],
    ['no secret file and no --no-register', base, /--passphrase-file or --token-file is required/],
    ['option without value', [...base, '--no-register', '--pin'], /--pin needs a value/],
    ['server that is not ws(s)://', ['--server', 'http://x', '--prefix', prefix, '--no-register'], /ws:\/\/ or wss:\/\//],
    ['relative prefix', ['--server', SERVER, '--prefix', 'rel/dir', '--no-register'], /--prefix must be an absolute path/],
  ];
  for (const [what, args, msg] of cases) {
    const r = await run(INSTALL, args);
    t.equal(r.code, 2, `${what}: exit 2`);
    t.match(r.stderr, msg, `${what}: message`);
    t.match(lastLine(r.stdout), /^MOBILITY-INSTALL fail MOB_ERR_USAGE /, `${what}: machine-readable line`);
  }
  const u = await run(UNINSTALL, ['--prefix', prefix, '--bogus']);
  t.equal(u.code, 2, 'uninstall: unknown option is exit 2');
  t.same(await fsp.readdir(prefix), [], 'nothing was created');
});

t.test('not root: exit 10 with MOB_ERR_PRE_NOT_ROOT', { skip: process.getuid?.() !== 0 ? 'needs root to drop to nobody' : false }, async (t) => {
  const setpriv = spawnSync('setpriv', ['--version']);
  if (setpriv.error) { t.comment('setpriv is not installed: skipped'); return; }
  const prefix = await emptyPrefix();
  // nobody must be able to read the bundle
  for (const d of [work, path.join(work, 'unpacked')]) await fsp.chmod(d, 0o755);
  const r = await run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', INSTALL,
    '--server', SERVER, '--prefix', prefix, '--no-register', '--skip-preflight', '--no-start']);
  t.equal(r.code, 10, r.stderr);
  t.match(lastLine(r.stdout), /^MOBILITY-INSTALL fail MOB_ERR_PRE_NOT_ROOT /);
  t.same(await fsp.readdir(prefix), [], 'nothing was created');
});

t.test('install, upgrade and uninstall leave no residue', async (t) => {
  const prefix = await emptyPrefix();
  const args = ['--server', SERVER, '--prefix', prefix, '--skip-preflight', '--no-register', '--no-start'];
  const before = await listing(prefix);

  const r1 = await run(INSTALL, args);
  t.equal(r1.code, 0, r1.stderr);
  t.equal(lastLine(r1.stdout), `MOBILITY-INSTALL ok ${VERSION}`);
  const installed = await listing(prefix);
  const has = (line: string) => t.ok(installed.includes(line), line);
  has('d 0755 opt/mobility');
  has('f 0755 opt/mobility/install.sh');
  has('f 0755 opt/mobility/uninstall.sh');
  has('f 0644 opt/mobility/dist/src/cli/main.js');
  has('f 0600 etc/mobility/agent.json');
  has('d 0700 var/lib/mobility');
  has('d 0750 var/log/mobility');
  has('f 0600 var/lib/mobility/install-manifest');
  has('f 0644 etc/systemd/system/mobility-agent.service');
  has('l 0777 usr/local/bin/mobility -> ../../../opt/mobility/bin/mobility.js');
  t.equal(fs.realpathSync(path.join(prefix, 'usr/local/bin/mobility')), path.join(prefix, 'opt/mobility/bin/mobility.js'), 'the CLI link resolves to bin/mobility.js');

  const config = JSON.parse(await fsp.readFile(path.join(prefix, 'etc/mobility/agent.json'), 'utf8')) as unknown;
  t.same(config, { server: SERVER, stateDir: `${prefix}/var/lib/mobility`, logFile: `${prefix}/var/log/mobility/agent.log` }, 'agent.json');
  const unit = await fsp.readFile(path.join(prefix, 'etc/systemd/system/mobility-agent.service'), 'utf8');
  t.match(unit, `\nExecStart=${process.execPath} ${prefix}/opt/mobility/dist/src/cli/main.js agent --config ${prefix}/etc/mobility/agent.json\n`);
  for (const line of ['Type=simple', 'ExecReload=/bin/kill -HUP $MAINPID', 'KillSignal=SIGTERM', 'TimeoutStopSec=60', 'Restart=on-failure', 'RestartSec=5',
    'After=network-online.target', 'Wants=network-online.target', 'WantedBy=multi-user.target', 'Environment=NODE_ENV=production', `WorkingDirectory=${prefix}/var/lib/mobility`]) {
    t.ok(unit.split('\n').includes(line), `unit has ${line}`);
  }
  t.notMatch(unit, /@[A-Z]+@/, 'every placeholder substituted');
  const manifest = (await fsp.readFile(path.join(prefix, 'var/lib/mobility/install-manifest'), 'utf8')).trim().split('\n');
  t.same(manifest.map((l) => l.split(' ')[1]).sort(), installed.filter((l) => !l.includes(' opt/mobility/')).map((l) => l.split(' ')[2]).sort(),
    'the manifest lists every path install.sh created (the app as one tree)');

  const keep = path.join(prefix, 'var/lib/mobility/keep.me');
  await fsp.writeFile(keep, 'digest map, say\n');
  await fsp.writeFile(path.join(prefix, 'opt/mobility/stale-file'), 'from the old version\n');
  const r2 = await run(INSTALL, args);
  t.equal(r2.code, 0, r2.stderr);
  t.equal(lastLine(r2.stdout), `MOBILITY-INSTALL ok ${VERSION}`);
  const upgraded = await listing(prefix);
  t.same(upgraded.filter((l) => !l.endsWith(' var/lib/mobility/keep.me')), installed, 'upgrade gives the same paths and modes');
  t.equal(await fsp.readFile(keep, 'utf8'), 'digest map, say\n', 'state is kept');
  t.notOk(fs.existsSync(path.join(prefix, 'opt/mobility.new')), 'no opt/mobility.new');
  t.notOk(fs.existsSync(path.join(prefix, 'opt/mobility.old')), 'no opt/mobility.old');
  t.notOk(fs.existsSync(path.join(prefix, 'opt/mobility/stale-file')), 'the app directory was replaced, not merged');
  t.same(JSON.parse(await fsp.readFile(path.join(prefix, 'etc/mobility/agent.json'), 'utf8')), config, 'same config');

  // an upgrade may omit --server: it comes from agent.json; extra keys survive
  const cfgPath = path.join(prefix, 'etc/mobility/agent.json');
  await fsp.writeFile(cfgPath, JSON.stringify({ ...(config as object), agentId: 'web-01' }));
  const r3 = await run(INSTALL, ['--prefix', prefix, '--skip-preflight', '--no-register', '--no-start']);
  t.equal(r3.code, 0, r3.stderr);
  t.same(JSON.parse(await fsp.readFile(cfgPath, 'utf8')), { ...(config as object), agentId: 'web-01' }, 'extra keys are kept, server taken from the old config');

  const u = await run(path.join(prefix, 'opt/mobility/uninstall.sh'), []);
  t.equal(u.code, 0, u.stderr);
  t.equal(lastLine(u.stdout), 'MOBILITY-UNINSTALL ok');
  t.match(u.stdout, `removed ${prefix}/opt/mobility/`);
  t.same(await listing(prefix), before, 'the installed uninstall.sh (prefix inferred) leaves the prefix as it was');
  const u2 = await run(UNINSTALL, ['--prefix', prefix]);
  t.equal(u2.code, 0, 'a second uninstall is a no-op');
});

t.test('uninstall --keep-state keeps var/lib/mobility and etc/mobility only', async (t) => {
  const prefix = await emptyPrefix();
  const r = await run(INSTALL, ['--server', SERVER, '--prefix', prefix, '--skip-preflight', '--no-register', '--no-start']);
  t.equal(r.code, 0, r.stderr);
  await fsp.writeFile(path.join(prefix, 'var/lib/mobility/agent.pem'), 'CERT\n', { mode: 0o600 });
  await fsp.writeFile(path.join(prefix, 'var/log/mobility/agent.log'), 'log\n');
  const dry = await run(UNINSTALL, ['--prefix', prefix, '--keep-state', '--dry-run']);
  t.equal(dry.code, 0, dry.stderr);
  t.equal(lastLine(dry.stdout), 'MOBILITY-UNINSTALL dry-run');
  const u = await run(UNINSTALL, ['--prefix', prefix, '--keep-state']);
  t.equal(u.code, 0, u.stderr);
  const left = await listing(prefix);
  t.same(left, [
    'd 0755 etc',
    'd 0750 etc/mobility',
    'f 0600 etc/mobility/agent.json',
    'd 0755 var',
    'd 0755 var/lib',
    'd 0700 var/lib/mobility',
    'f 0600 var/lib/mobility/agent.pem',
    'f 0600 var/lib/mobility/install-manifest',
  ], 'only the state and the config (and their parents) remain');

  // reinstalling over kept state finds the registration-less state intact; a
  // full uninstall afterwards still removes everything
  const again = await run(INSTALL, ['--prefix', prefix, '--skip-preflight', '--no-register', '--no-start']);
  t.equal(again.code, 0, again.stderr);
  t.ok(fs.existsSync(path.join(prefix, 'var/lib/mobility/agent.pem')), 'credentials survived');
  const u2 = await run(UNINSTALL, ['--prefix', prefix]);
  t.equal(u2.code, 0, u2.stderr);
  t.same(await listing(prefix), [], 'empty after a full uninstall');
});
