/**
 * CLI profiles (issue 14, item 5), with real `mobility server` processes on loopback and the
 * real CLI: `mobility login` checks the connection with an authenticated request and saves the
 * server, the CA (or pin) and the token in CONFIG-DIR/profiles/NAME.json (0600, directory 0700);
 * operator commands given no connection options use it (--profile, MOBILITY_PROFILE, default);
 * explicit options win; a refused token, CA or pin saves nothing; a profile open to group or
 * others is refused; logout removes it; no command ever prints the token. Nothing needs root.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import t, { type Test } from 'tap';
import { ensureTlsIdentity } from '../../src/transport/tls.js';
import { runCli, startServer, tmpDir } from '../helpers.js';

type Run = { code: number | null; stdout: string; stderr: string };

const mode = (p: string) => (fs.statSync(p).mode & 0o777).toString(8).padStart(4, '0');

t.test('profiles: login, use, select, override, refuse, logout', async (t) => {
  const dir = await tmpDir(t, 'profiles-');
  const [a, b] = await Promise.all([startServer(t, path.join(dir, 'srv-a')), startServer(t, path.join(dir, 'srv-b'))]);
  const tokenA = (await fsp.readFile(a.info.tokenFile, 'utf8')).trim();
  const tokenB = (await fsp.readFile(b.info.tokenFile, 'utf8')).trim();
  // a config directory that does not exist yet: login creates it (0700)
  const cfg = path.join(dir, 'config', 'mobility');
  const profiles = path.join(cfg, 'profiles');
  const fileOf = (name: string) => path.join(profiles, `${name}.json`);
  const baseEnv: NodeJS.ProcessEnv = { ...process.env, MOBILITY_CONFIG_DIR: cfg, MOBILITY_PROFILE: '' };

  const runs: Run[] = [];
  const cli = async (args: string[], env: NodeJS.ProcessEnv = {}): Promise<Run> => {
    const r = await runCli(args, { ...baseEnv, ...env }).done;
    runs.push(r);
    return r;
  };
  const ok = (t: Test, r: Run, what: string) => t.equal(r.code, 0, `${what}: exit 0 ${r.stderr.trim()}`);

  // a policy only server A has, to tell the servers apart
  ok(t, await cli(['policy', 'create', 'only-on-a', '--data-dir', a.info.dataDir, '--server', a.info.url]), 'policy on A');
  const policiesOf = async (t: Test, args: string[], env?: NodeJS.ProcessEnv): Promise<string[]> => {
    const r = await cli(['policy', 'list', '--json', ...args], env);
    ok(t, r, `policy list ${args.join(' ')}`);
    return (JSON.parse(r.stdout) as { policies: { name: string }[] }).policies.map((p) => p.name);
  };

  await t.test('no connection and no profile: a usage error that mentions mobility login', async (t) => {
    const r = await cli(['status']);
    t.equal(r.code, 2);
    t.match(r.stderr, /MOB_ERR_USAGE: no server connection given: .*mobility login/);
    const named = await cli(['status', '--profile', 'nope']);
    t.equal(named.code, 3, 'a named profile that does not exist: configuration error');
    t.match(named.stderr, /MOB_ERR_CONFIG: no profile 'nope' \(named by --profile\).*mobility login --profile nope/);
    const env = await cli(['machines'], { MOBILITY_PROFILE: 'nope' });
    t.equal(env.code, 3);
    t.match(env.stderr, /named by MOBILITY_PROFILE/);
    const badName = await cli(['login', '--profile', '../x', '--data-dir', a.info.dataDir, '--server', a.info.url]);
    t.equal(badName.code, 2, 'a profile name that is no plain file name: usage');
    t.match(badName.stderr, /MOB_ERR_USAGE: --profile "\.\.\/x" is not a profile name/);
    const noCred = await cli(['login', '--server', a.info.url, '--ca', a.info.caFile!]);
    t.equal(noCred.code, 2, 'login without a credential: usage');
    t.match(noCred.stderr, /login needs the credential/);
    t.notOk(fs.existsSync(cfg), 'nothing was created');
  });

  await t.test('a wrong token, CA or pin at login: the coded error, nothing saved', async (t) => {
    const wrongToken = path.join(dir, 'wrong-token');
    await fsp.writeFile(wrongToken, 'f'.repeat(64) + '\n', { mode: 0o600 });
    const otherCa = (await ensureTlsIdentity(path.join(dir, 'other-id'))).caFile;
    const cases: [string, string[], RegExp][] = [
      ['wrong token', ['--server', a.info.url, '--token-file', wrongToken, '--ca', a.info.caFile!], /MOB_ERR_AUTH: server: missing or wrong bearer token/],
      ['wrong CA', ['--server', a.info.url, '--token-file', a.info.tokenFile, '--ca', otherCa], /MOB_ERR_TLS_PIN: the server certificate is not signed by the given CA/],
      ['wrong pin', ['--server', a.info.url, '--token-file', a.info.tokenFile, '--pin', b.info.fingerprint!], /MOB_ERR_TLS_PIN: the server certificate fingerprint .* does not match --pin/],
    ];
    for (const [what, args, err] of cases) {
      const r = await cli(['login', ...args]);
      t.equal(r.code, 4, `${what}: exit 4`);
      t.match(r.stderr, err, `${what}: the same coded error as every command`);
      t.notOk(fs.existsSync(fileOf('default')), `${what}: no profile saved`);
    }
    const down = await cli(['login', '--server', 'wss://127.0.0.1:9', '--token-file', a.info.tokenFile, '--ca', a.info.caFile!]);
    t.equal(down.code, 5, 'nothing listening: unreachable, exit 5');
    t.notOk(fs.existsSync(fileOf('default')), 'no profile saved');
    t.same(fs.existsSync(profiles) ? fs.readdirSync(profiles) : [], [], 'the profiles directory holds nothing');
  });

  await t.test('login, then status, machines, points and policy with no connection options', async (t) => {
    const r = await cli(['login', '--server', a.info.url, '--token-file', a.info.tokenFile, '--ca', a.info.caFile!]);
    ok(t, r, 'login');
    t.match(r.stdout, new RegExp(`logged in to ${a.info.url.replace(/[.]/g, '\\.')} \\(CA [0-9A-F:]{95}; the server reports 0 protected disk\\(s\\)\\)`));
    t.match(r.stdout, `saved as profile default in ${fileOf('default')}`);
    t.match(r.stdout, 'operator commands given no connection options use it now');
    t.equal(mode(path.dirname(cfg)), '0700', 'the config directories are created 0700');
    t.equal(mode(cfg), '0700');
    t.equal(mode(profiles), '0700', 'the profiles directory is 0700');
    t.equal(mode(fileOf('default')), '0600', 'the profile file is 0600');
    t.same(fs.readdirSync(profiles), ['default.json'], 'no temporary file left behind');
    const saved = JSON.parse(await fsp.readFile(fileOf('default'), 'utf8')) as Record<string, unknown>;
    t.equal(saved.server, a.info.url, 'the profile holds the server');
    t.equal(saved.ca, await fsp.readFile(a.info.caFile!, 'utf8'), 'a copy of the CA certificate');
    t.equal(saved.token, tokenA, 'and the token');

    for (const args of [['status'], ['machines'], ['points', '--agent-id', 'web1'], ['policy', 'list'], ['status', '--json']]) ok(t, await cli(args), args.join(' '));
    t.ok((await policiesOf(t, [])).includes('only-on-a'), 'the default profile is server A');

    // the CA copy is what is used: the original may go away
    const caCopy = path.join(dir, 'ca-copy.pem');
    await fsp.copyFile(a.info.caFile!, caCopy);
    ok(t, await cli(['login', '--profile', 'a2', '--server', a.info.url, '--token-file', a.info.tokenFile, '--ca', caCopy]), 'login with a CA copy');
    await fsp.rm(caCopy);
    ok(t, await cli(['status', '--profile', 'a2']), 'status with the CA file gone');
    ok(t, await cli(['logout', '--profile', 'a2']), 'logout a2');
  });

  await t.test('--profile and MOBILITY_PROFILE select among two servers', async (t) => {
    const r = await cli(['login', '--profile', 'b', '--server', b.info.url, '--token-file', b.info.tokenFile, '--pin', b.info.fingerprint!, '--json']);
    ok(t, r, 'login --profile b with a pin');
    const j = JSON.parse(r.stdout) as Record<string, unknown>;
    t.same({ profile: j.profile, server: j.server, pin: j.pin, ca: j.ca, usedByDefault: j.usedByDefault }, { profile: 'b', server: b.info.url, pin: b.info.fingerprint, ca: null, usedByDefault: false });
    t.equal(mode(fileOf('b')), '0600');
    t.notOk((await policiesOf(t, ['--profile', 'b'])).includes('only-on-a'), '--profile b: server B');
    t.ok((await policiesOf(t, [])).includes('only-on-a'), 'no --profile: still the default, server A');
    t.notOk((await policiesOf(t, [], { MOBILITY_PROFILE: 'b' })).includes('only-on-a'), 'MOBILITY_PROFILE=b: server B');
    t.ok((await policiesOf(t, ['--profile', 'default'], { MOBILITY_PROFILE: 'b' })).includes('only-on-a'), '--profile wins over MOBILITY_PROFILE');

    const list = await cli(['profiles']);
    ok(t, list, 'profiles');
    const lines = list.stdout.trimEnd().split('\n');
    t.match(lines[0], /^NAME\s+SERVER\s+TRUST\s+SAVED AT$/);
    t.match(lines[1], new RegExp(`^b\\s+${b.info.url.replace(/[.]/g, '\\.')}\\s+pin ${b.info.fingerprint}\\s+\\d{4}-`));
    t.match(lines[2], new RegExp(`^default \\*\\s+${a.info.url.replace(/[.]/g, '\\.')}\\s+CA [0-9A-F:]{95}\\s+\\d{4}-`));
    t.match(list.stdout, /\* used by commands given no connection options \(the default profile\)/);
    const viaLogin = await cli(['login', '--list']);
    t.equal(viaLogin.stdout, list.stdout, 'login --list is the same list');
    const withEnv = await cli(['profiles', '--json'], { MOBILITY_PROFILE: 'b' });
    const pj = JSON.parse(withEnv.stdout) as { configDir: string; profiles: Record<string, unknown>[] };
    t.equal(pj.configDir, cfg);
    t.same(pj.profiles.map((p) => [p.name, p.usedByDefault]), [['b', true], ['default', false]], 'the profile MOBILITY_PROFILE names is the one in use');
    t.ok(pj.profiles.every((p) => !('token' in p)), 'no token in the JSON list');
  });

  await t.test('explicit connection options win over the profile', async (t) => {
    // the default profile is A; the options name B
    t.notOk((await policiesOf(t, ['--data-dir', b.info.dataDir, '--server', b.info.url])).includes('only-on-a'), '--data-dir: server B, the profile unused');
    t.notOk((await policiesOf(t, ['--token-file', b.info.tokenFile, '--server', b.info.url, '--ca', b.info.caFile!])).includes('only-on-a'), '--token-file: server B');
    t.ok((await policiesOf(t, ['--data-dir', a.info.dataDir, '--server', a.info.url], { MOBILITY_PROFILE: 'b' })).includes('only-on-a'), 'over MOBILITY_PROFILE too');
    const both = await cli(['status', '--profile', 'b', '--data-dir', a.info.dataDir]);
    t.equal(both.code, 2, '--profile with --data-dir: two credentials, a usage error');
    t.match(both.stderr, /MOB_ERR_USAGE: --profile b and --data-dir both give the credential/);
    // --server, --ca, --pin replace the profile's: A's token sent to B (pinned) is refused by B
    const other = await cli(['status', '--server', b.info.url, '--pin', b.info.fingerprint!]);
    t.equal(other.code, 4, "--server and --pin replace the profile's: B refuses A's token");
    t.match(other.stderr, /MOB_ERR_AUTH: server: missing or wrong bearer token \(the token saved in profile default: .*mobility login --profile default/);
    const noTrust = await cli(['status', '--server', b.info.url]);
    t.equal(noTrust.code, 4, "--server alone keeps the profile's CA, which B's certificate does not chain to");
    t.match(noTrust.stderr, /MOB_ERR_TLS_PIN: .*the CA saved in profile default/);
    const pinB = await cli(['status', '--profile', 'b', '--pin', a.info.fingerprint!]);
    t.equal(pinB.code, 4, "--pin replaces profile b's pin");
    t.match(pinB.stderr, /does not match --pin/);
    const badPin = await cli(['status', '--pin', 'AB'.repeat(32)]);
    t.equal(badPin.code, 4);
    t.match(badPin.stderr, /MOB_ERR_TLS_PIN: the server certificate fingerprint .* does not match --pin/);
    // the agent-side commands never read a profile
    const rep = await cli(['replicate', '--disk', path.join(dir, 'none.img')]);
    t.equal(rep.code, 2, 'replicate without --server: usage, as before');
    t.match(rep.stderr, /--server wss:\/\/HOST:PORT is required/);
  });

  await t.test('a refused login keeps the profile it would have replaced', async (t) => {
    const before = await fsp.readFile(fileOf('b'), 'utf8');
    const r = await cli(['login', '--profile', 'b', '--server', b.info.url, '--token-file', a.info.tokenFile, '--pin', b.info.fingerprint!]);
    t.equal(r.code, 4);
    t.match(r.stderr, /MOB_ERR_AUTH/);
    t.equal(await fsp.readFile(fileOf('b'), 'utf8'), before, 'profile b unchanged');
  });

  await t.test('a profile file open to group or others is refused; a broken one too', async (t) => {
    await fsp.chmod(fileOf('default'), 0o640);
    const r = await cli(['status']);
    t.equal(r.code, 3, 'group-readable: configuration error');
    t.match(r.stderr, new RegExp(`MOB_ERR_CONFIG: the profile ${fileOf('default').replace(/[.]/g, '\\.')} is open to group or others \\(mode 0640\\).*chmod 600`));
    const list = await cli(['profiles']);
    ok(t, list, 'profiles still lists');
    t.match(list.stdout, /^default \*\s+-\s+unusable\s+-$/m, 'the refused profile, as unusable');
    t.match(list.stderr, /profile default: MOB_ERR_CONFIG: .*mode 0640/);
    await fsp.chmod(fileOf('default'), 0o604);
    t.equal((await cli(['machines'])).code, 3, 'world-readable: refused');
    await fsp.chmod(fileOf('default'), 0o600);
    ok(t, await cli(['machines']), 'chmod 600: used again');

    // a token refused by the server: the hint says to log in again
    const saved = JSON.parse(await fsp.readFile(fileOf('default'), 'utf8')) as Record<string, unknown>;
    await fsp.writeFile(fileOf('stale'), JSON.stringify({ ...saved, token: 'e'.repeat(64) }), { mode: 0o600 });
    const stale = await cli(['status', '--profile', 'stale']);
    t.equal(stale.code, 4);
    t.match(stale.stderr, /MOB_ERR_AUTH: .*log in again with mobility login --profile stale/);
    // not a profile: refused without quoting the file
    await fsp.writeFile(fileOf('broken'), `{"server": "${a.info.url}", "token": "${tokenA}"`, { mode: 0o600 });
    const broken = await cli(['status', '--profile', 'broken']);
    t.equal(broken.code, 3);
    t.match(broken.stderr, /MOB_ERR_CONFIG: the profile .*broken\.json is not a valid profile \(not JSON\)/);
    ok(t, await cli(['logout', '--profile', 'stale']), 'logout stale');
    ok(t, await cli(['logout', '--profile', 'broken']), 'logout broken');
  });

  await t.test('logout removes a profile', async (t) => {
    const r = await cli(['logout', '--profile', 'b']);
    ok(t, r, 'logout b');
    t.match(r.stdout, `removed profile b (${fileOf('b')})`);
    t.notOk(fs.existsSync(fileOf('b')));
    const gone = await cli(['status', '--profile', 'b']);
    t.equal(gone.code, 3, 'then --profile b is unknown');
    const again = await cli(['logout', '--profile', 'b']);
    t.equal(again.code, 3, 'logging out of a missing profile: configuration error');
    t.match(again.stderr, /MOB_ERR_CONFIG: no profile 'b'/);
    ok(t, await cli(['logout']), 'logout (the default profile)');
    t.same(fs.readdirSync(profiles), [], 'no profile left');
    const none = await cli(['status']);
    t.equal(none.code, 2, 'no default profile any more: the usage error');
    t.match(none.stderr, /mobility login/);
    const list = await cli(['profiles']);
    t.match(list.stdout, /^no profiles in .*: save one with mobility login/);
  });

  await t.test('login --data-dir on the server; XDG_CONFIG_HOME and HOME locate the config directory', async (t) => {
    const xdg = path.join(dir, 'xdg');
    const env = { MOBILITY_CONFIG_DIR: '', XDG_CONFIG_HOME: xdg };
    ok(t, await cli(['login', '--data-dir', a.info.dataDir, '--server', a.info.url], env), 'login --data-dir');
    const file = path.join(xdg, 'mobility', 'profiles', 'default.json');
    t.equal(mode(file), '0600', 'saved under $XDG_CONFIG_HOME/mobility');
    t.equal((JSON.parse(await fsp.readFile(file, 'utf8')) as { ca: string }).ca, await fsp.readFile(a.info.caFile!, 'utf8'), 'with a copy of DATA-DIR/tls/ca.pem');
    ok(t, await cli(['status'], env), 'and used');
    const home = path.join(dir, 'home');
    const homeEnv = { MOBILITY_CONFIG_DIR: '', XDG_CONFIG_HOME: '', HOME: home };
    ok(t, await cli(['login', '--profile', 'h', '--server', a.info.url, '--token-file', a.info.tokenFile, '--pin', a.info.fingerprint!], homeEnv), 'login with only HOME');
    t.equal(mode(path.join(home, '.config', 'mobility', 'profiles', 'h.json')), '0600', 'saved under ~/.config/mobility');
    ok(t, await cli(['points', '--profile', 'h', '--agent-id', 'x'], homeEnv), 'and used');
  });

  // checked last, over every command this test ran
  t.ok(runs.length > 40, `${runs.length} commands ran`);
  for (const secret of [tokenA, tokenB, 'f'.repeat(64), 'e'.repeat(64)]) {
    t.notOk(runs.some((r) => r.stdout.includes(secret) || r.stderr.includes(secret)), 'no token on any stdout or stderr');
  }
});
