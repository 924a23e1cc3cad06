import t from 'tap';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  WindowsPushInstaller,
  buildWindowsPushScript,
  psQuote,
  wrapForInvoke,
  type PowerShellLike,
  type PushShellEnv,
} from '../../src/install/windows-push.js';
import type { PushHost, PushRequest, PushStep } from '../../src/install/push-types.js';
import { tmpDir } from '../helpers.js';

// Compiled to dist/test/install/: the golden file lives in the source tree.
const GOLDEN = fileURLToPath(new URL('../../../test/install/golden/windows-push.ps1', import.meta.url));

const PASSWORD = 'Pa55-w0rd-NOT-IN-SCRIPT';
const TOKEN = 'tok-7f3c9a1e5b2d4c6e8f0a1b2c3d4e5f60';
const FINGERPRINT = Array.from({ length: 32 }, (_, i) => (i * 7 + 16).toString(16).toUpperCase().padStart(2, '0').slice(-2)).join(':');

const HOST: PushHost = { host: 'win-app01.corp.example', user: 'CORP\\mobility-push', password: PASSWORD };
const REQ: PushRequest = {
  bundle: '/var/lib/mobility/bundles/mobility-agent-0.1.0-win-x64.zip',
  serverUrl: 'wss://mobility.corp.example:8443',
  token: TOKEN,
  serverFingerprint: FINGERPRINT,
};

/** Decodes the one line install() sends to the shell back into the script. */
function unwrap(invoked: string): string {
  const m = /FromBase64String\('([A-Za-z0-9+/=]+)'\)/.exec(invoked);
  if (!m) throw new Error('not a wrapped script');
  return Buffer.from(m[1], 'base64').toString('utf8');
}

/**
 * Reads a PowerShell single-quoted string literal starting at text[start]
 * (which must be a quote), the way PowerShell's tokenizer does: any of
 * ' U+2018 U+2019 U+201A U+201B opens and closes it, and two of them in a row
 * stand for the second one. Returns the value and the index after the literal.
 */
function readSingleQuoted(text: string, start: number): { value: string; end: number } {
  const isQuote = (c: string | undefined) => c !== undefined && "'\u2018\u2019\u201A\u201B".includes(c);
  if (!isQuote(text[start])) throw new Error('no opening quote');
  let value = '';
  for (let i = start + 1; i < text.length; i++) {
    const c = text[i];
    if (isQuote(c)) {
      if (!isQuote(text[i + 1])) return { value, end: i + 1 };
      value += text[i + 1];
      i++;
    } else {
      value += c;
    }
  }
  throw new Error('unterminated literal');
}

async function bundleFile(t: Parameters<typeof tmpDir>[0]): Promise<string> {
  const dir = await tmpDir(t, 'mobility-winpush-');
  const file = path.join(dir, 'mobility-agent-win-x64.zip');
  await fsp.writeFile(file, Buffer.from('PK\u0005\u0006' + '\0'.repeat(18), 'binary'));
  return file;
}

/*
 * A fake PowerShellLike: this is a mock. No real Windows host (WinRM, an
 * Administrators account, install.ps1) can run on this Linux test machine, and
 * pwsh is not installed, so these tests feed install() the lines the script
 * prints and check how it reads them. The script text itself is covered by
 * the golden file; the real shell by the MOB_ERR_PUSH_NO_POWERSHELL test.
 */
class FakeShell implements PowerShellLike {
  invoked: string[] = [];
  disposed = false;
  constructor(private readonly output: string, private readonly chunkSize = 0) {}
  async invoke(script: string, onOutput?: (text: string) => void): Promise<{ raw: string; hadErrors?: boolean }> {
    this.invoked.push(script);
    if (onOutput && this.chunkSize > 0) {
      for (let i = 0; i < this.output.length; i += this.chunkSize) {
        onOutput(this.output.slice(i, i + this.chunkSize));
        await new Promise((r) => setImmediate(r));
      }
    }
    return { raw: this.output, hadErrors: false };
  }
  async dispose(): Promise<void> {
    this.disposed = true;
  }
}

const OK_OUTPUT = [
  'MOBILITY-STEP connect win-app01.corp.example:5985',
  'MOBILITY-STEP preflight',
  'MOBILITY-STEP upload 22 bytes',
  'MOBILITY-STEP install',
  'MOBILITY-INSTALLED Microsoft Windows Server 2019 Datacenter 10.0.17763',
  '',
].join('\r\n');

t.test('golden: the script for a fixed host and request', async (t) => {
  const script = buildWindowsPushScript(HOST, REQ);
  if (process.env.UPDATE_GOLDEN === '1') {
    await fsp.mkdir(path.dirname(GOLDEN), { recursive: true });
    await fsp.writeFile(GOLDEN, script);
    t.comment(`rewrote ${GOLDEN}`);
  }
  t.equal(script, fs.readFileSync(GOLDEN, 'utf8'), 'matches test/install/golden/windows-push.ps1 (UPDATE_GOLDEN=1 rewrites it)');
  t.equal(buildWindowsPushScript(HOST, REQ), script, 'deterministic');
  t.match(script, /^\$MobilityUseSsl = \$false$/m);
  t.match(buildWindowsPushScript({ ...HOST, port: 5986 }, REQ), /^\$MobilityUseSsl = \$true$/m, 'port 5986 uses -UseSSL');
  t.match(buildWindowsPushScript(HOST, REQ, { remoteDir: 'D:\\Staging' }), /^\$MobilityRemoteParent = 'D:\\Staging'$/m);
  t.throws(() => buildWindowsPushScript({ ...HOST, port: 70000 }, REQ), { code: 'MOB_ERR_CONFIG' });
});

t.test('no secret is in the golden file, the script or the line sent to the shell', async (t) => {
  const golden = fs.readFileSync(GOLDEN, 'utf8');
  const script = buildWindowsPushScript(HOST, REQ);
  for (const [name, text] of [['golden', golden], ['script', script], ['invoked line', wrapForInvoke(script)]] as const) {
    t.notOk(text.includes(PASSWORD), `${name} has no password`);
    t.notOk(text.includes(TOKEN), `${name} has no token`);
  }
  t.match(script, /\$env:MOBILITY_PUSH_PASSWORD/);
  t.match(script, /\$env:MOBILITY_PUSH_TOKEN/);
  for (const code of script.match(/MOB_ERR_[A-Z_]+/g) ?? []) t.match(code, /^MOB_ERR_PUSH_/, `${code} is a push code`);
});

t.test('quoting: a host, user or path with quotes cannot break out of its literal', async (t) => {
  const nasty: PushHost = {
    host: "evil'; Remove-Item -Recurse -Force C:\\; '",
    user: "O'Brien\u2019); Stop-Computer; (\u2018",
    password: PASSWORD,
  };
  const req: PushRequest = { ...REQ, bundle: "/tmp/it's here $(whoami) `n.zip", serverUrl: "wss://x:1/'+(calc)+'" };
  const script = buildWindowsPushScript(nasty, req, { remoteDir: "C:\\a'b" });
  const expect: Record<string, string> = {
    MobilityHost: nasty.host,
    MobilityUser: nasty.user,
    MobilityBundle: req.bundle,
    MobilityServerUrl: req.serverUrl,
    MobilityRemoteParent: "C:\\a'b",
  };
  for (const [name, value] of Object.entries(expect)) {
    const prefix = `$${name} = `;
    const line = script.split('\n').find((l) => l.startsWith(prefix));
    if (!line) {
      t.fail(`no ${name} line`);
      continue;
    }
    const lit = readSingleQuoted(line, prefix.length);
    t.equal(lit.value, value, `${name} reads back as exactly the value`);
    t.equal(lit.end, line.length, `${name}: the literal ends the line (nothing after it runs)`);
  }
  t.equal(psQuote("a'b"), "'a''b'");
  t.equal(psQuote('a\u2019b'), "'a\u2019\u2019b'");
  t.equal(psQuote('$(x) `n'), "'$(x) `n'", 'no expansion inside single quotes, nothing to escape');
});

t.test('fake shell: steps, install, registration -> ok with the agent id', async (t) => {
  const bundle = await bundleFile(t);
  const fake = new FakeShell(OK_OUTPUT);
  let envSeen: PushShellEnv | undefined;
  const waited: string[] = [];
  const installer = new WindowsPushInstaller({
    shell: (env) => {
      envSeen = env;
      return fake;
    },
    waitForRegistration: async (h) => {
      waited.push(h);
      return 'agent-win-app01';
    },
  });
  const steps: Array<[PushStep, string | undefined]> = [];
  const r = await installer.install(HOST, { ...REQ, bundle }, (s, d) => steps.push([s, d]));
  t.equal(r.ok, true, r.message);
  t.equal(r.step, 'done');
  t.equal(r.agentId, 'agent-win-app01');
  t.equal(r.host, HOST.host);
  t.equal(r.code, undefined);
  t.match(r.message, /Windows Server 2019/);
  t.type(r.ms, 'number');
  t.same(steps.map((s) => s[0]), ['connect', 'preflight', 'upload', 'install', 'register', 'done']);
  t.equal(steps[0][1], 'win-app01.corp.example:5985');
  t.same(waited, [HOST.host]);
  t.ok(fake.disposed, 'the shell was disposed');
  t.same(envSeen, { MOBILITY_PUSH_PASSWORD: PASSWORD, MOBILITY_PUSH_TOKEN: TOKEN }, 'the secrets go to the shell as its environment');
  t.equal(fake.invoked.length, 1);
  t.notOk(fake.invoked[0].includes('\n'), 'one line is sent');
  t.notOk(fake.invoked[0].includes(TOKEN) || fake.invoked[0].includes(PASSWORD), 'no secret in what is sent');
  t.equal(unwrap(fake.invoked[0]), buildWindowsPushScript(HOST, { ...REQ, bundle }), 'the line runs exactly the planned script');
});

t.test('fake shell that streams: steps are reported as they arrive, split anywhere', async (t) => {
  const bundle = await bundleFile(t);
  for (const chunk of [1, 7, 64]) {
    const steps: PushStep[] = [];
    let resolvedWith = -1;
    const fake = new FakeShell(OK_OUTPUT, chunk);
    const orig = fake.invoke.bind(fake);
    fake.invoke = async (s, on) => {
      const r = await orig(s, on);
      resolvedWith = steps.length;
      return r;
    };
    const r = await new WindowsPushInstaller({ shell: () => fake }).install(HOST, { ...REQ, bundle }, (s) => steps.push(s));
    t.equal(r.ok, true);
    t.equal(resolvedWith, 4, `chunks of ${chunk}: four steps were reported before the script finished`);
    t.same(steps, ['connect', 'preflight', 'upload', 'install', 'done'], 'each once, in order; no register without waitForRegistration');
    t.match(r.message, /registration not awaited/);
  }
});

t.test('fake shell: MOBILITY-FAIL MOB_ERR_PUSH_AUTH -> ok:false at connect', async (t) => {
  const bundle = await bundleFile(t);
  let waited = false;
  const installer = new WindowsPushInstaller({
    shell: () => new FakeShell('MOBILITY-STEP connect win-app01.corp.example:5985\nMOBILITY-FAIL MOB_ERR_PUSH_AUTH cannot open a PowerShell remoting session: Access is denied.\n'),
    waitForRegistration: async () => {
      waited = true;
      return 'x';
    },
  });
  const r = await installer.install(HOST, { ...REQ, bundle });
  t.equal(r.ok, false);
  t.equal(r.code, 'MOB_ERR_PUSH_AUTH');
  t.equal(r.step, 'connect');
  t.match(r.message, /Access is denied/);
  t.notOk(waited, 'no registration wait after a failure');

  const bare = await new WindowsPushInstaller({ shell: () => new FakeShell('MOBILITY-FAIL MOB_ERR_PUSH_AUTH denied') }).install(HOST, { ...REQ, bundle });
  t.equal(bare.code, 'MOB_ERR_PUSH_AUTH');
  t.equal(bare.step, 'connect', 'a failure before any step line is at connect');
});

t.test('fake shell: failures in later steps keep their step and code; secrets are scrubbed', async (t) => {
  const bundle = await bundleFile(t);
  const cases: Array<[string, string, PushStep]> = [
    ['MOBILITY-STEP connect h:5985\nMOBILITY-STEP preflight\nMOBILITY-FAIL MOB_ERR_PUSH_NOT_ROOT CORP\\x is not an administrator', 'MOB_ERR_PUSH_NOT_ROOT', 'preflight'],
    ['MOBILITY-STEP connect h:5985\nMOBILITY-STEP preflight\nMOBILITY-FAIL MOB_ERR_PUSH_OS_UNSUPPORTED Windows Server 2012 R2 6.3.9600', 'MOB_ERR_PUSH_OS_UNSUPPORTED', 'preflight'],
    ['MOBILITY-STEP connect h:5985\nMOBILITY-STEP preflight\nMOBILITY-FAIL MOB_ERR_PUSH_LOW_DISK C: has 100 MiB free', 'MOB_ERR_PUSH_LOW_DISK', 'preflight'],
    ['MOBILITY-STEP connect h:5985\nMOBILITY-FAIL MOB_ERR_PUSH_UNREACHABLE WinRM cannot complete the operation', 'MOB_ERR_PUSH_UNREACHABLE', 'connect'],
    [`MOBILITY-STEP connect h\nMOBILITY-STEP preflight\nMOBILITY-STEP upload\nMOBILITY-STEP install\nMOBILITY-FAIL MOB_ERR_PUSH_INSTALL_FAILED install.ps1 exited with code 1: bad token ${TOKEN}`, 'MOB_ERR_PUSH_INSTALL_FAILED', 'install'],
    ['MOBILITY-STEP connect h\nMOBILITY-STEP preflight\nMOBILITY-FAIL MOB_ERR_BOGUS something odd', 'MOB_ERR_PUSH_INSTALL_FAILED', 'preflight'],
    ['MOBILITY-STEP connect h\nMOBILITY-STEP preflight\nMOBILITY-STEP upload\nsome stray error text', 'MOB_ERR_PUSH_INSTALL_FAILED', 'upload'],
  ];
  for (const [out, code, step] of cases) {
    const r = await new WindowsPushInstaller({ shell: () => new FakeShell(out) }).install(HOST, { ...REQ, bundle });
    t.equal(r.ok, false);
    t.equal(r.code, code, `${code} at ${step}`);
    t.equal(r.step, step);
    t.notOk(r.message.includes(TOKEN), 'token scrubbed from the message');
  }
});

t.test('waitForRegistration returning null, or not answering in time -> MOB_ERR_PUSH_REG_TIMEOUT', async (t) => {
  const bundle = await bundleFile(t);
  const steps: PushStep[] = [];
  const r = await new WindowsPushInstaller({ shell: () => new FakeShell(OK_OUTPUT), waitForRegistration: async () => null })
    .install(HOST, { ...REQ, bundle }, (s) => steps.push(s));
  t.equal(r.ok, false);
  t.equal(r.code, 'MOB_ERR_PUSH_REG_TIMEOUT');
  t.equal(r.step, 'register');
  t.equal(r.agentId, undefined);
  t.same(steps, ['connect', 'preflight', 'upload', 'install', 'register']);

  const slow = await new WindowsPushInstaller({
    shell: () => new FakeShell(OK_OUTPUT),
    registrationTimeoutMs: 50,
    waitForRegistration: () => new Promise(() => undefined),
  }).install(HOST, { ...REQ, bundle });
  t.equal(slow.code, 'MOB_ERR_PUSH_REG_TIMEOUT', 'registrationTimeoutMs bounds the wait');

  const broken = await new WindowsPushInstaller({
    shell: () => new FakeShell(OK_OUTPUT),
    waitForRegistration: async () => { throw new Error('db closed'); },
  }).install(HOST, { ...REQ, bundle });
  t.equal(broken.ok, false);
  t.equal(broken.code, 'MOB_ERR_INTERNAL');
  t.equal(broken.step, 'register');
});

t.test('bad host or request: refused before any shell is started', async (t) => {
  const bundle = await bundleFile(t);
  let started = 0;
  const installer = new WindowsPushInstaller({ shell: () => { started++; return new FakeShell(OK_OUTPUT); } });
  const cases: Array<[PushHost, PushRequest]> = [
    [{ host: 'h', user: 'u', keyFile: '/root/.ssh/id_ed25519' }, { ...REQ, bundle }],
    [{ host: 'h', user: 'u' }, { ...REQ, bundle }],
    [HOST, { ...REQ, bundle: path.join(path.dirname(bundle), 'missing.zip') }],
    [HOST, { ...REQ, bundle, serverUrl: 'ftp://x' }],
    [HOST, { ...REQ, bundle, serverFingerprint: 'AA:BB' }],
    [{ ...HOST, port: 0 }, { ...REQ, bundle }],
  ];
  for (const [h, req] of cases) {
    const r = await installer.install(h, req);
    t.equal(r.ok, false);
    t.equal(r.code, 'MOB_ERR_CONFIG', r.message);
    t.equal(r.step, 'connect');
    t.notOk(r.message.includes(PASSWORD));
  }
  t.equal(started, 0);
});

const pwshInstalled = !!process.env.NODE_POWERSHELL
  || (process.env.PATH ?? '').split(path.delimiter).some((d) => d !== '' && fs.existsSync(path.join(d, 'pwsh')));

t.test('the real default shell: pwsh is not installed here -> MOB_ERR_PUSH_NO_POWERSHELL', {
  skip: pwshInstalled ? 'pwsh is installed on this machine: the missing-executable path cannot be exercised' : false,
}, async (t) => {
  const bundle = await bundleFile(t);
  const steps: PushStep[] = [];
  const r = await new WindowsPushInstaller().install(HOST, { ...REQ, bundle }, (s) => steps.push(s));
  t.equal(r.ok, false);
  t.equal(r.code, 'MOB_ERR_PUSH_NO_POWERSHELL');
  t.equal(r.step, 'connect');
  t.match(r.message, /needs PowerShell \(pwsh\) on the server/);
  t.notOk(r.message.includes(PASSWORD) || r.message.includes(TOKEN));
  t.same(steps, [], 'no step was reached');
});
