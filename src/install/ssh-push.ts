/**
 * Linux push install over SSH (ssh2): connect, preflight on the host, upload
 * the bundle and a one-time token over SFTP, run install.sh (which runs the
 * full preflight, installs, registers with the token and starts the agent),
 * then wait until the agent's control connection reaches the server.
 * Failures map to stable MOB_ERR_PUSH_* codes (951xx in the spirit of Site
 * Recovery's push-install errors). Secrets are never logged or put on a
 * command line: the token travels as a 0600 file and is removed afterwards.
 */
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { Client, type ConnectConfig, type SFTPWrapper } from 'ssh2';
import { MobilityError, toMobilityError, type ErrorCode } from '../errors.js';
import type { PushHost, PushInstaller, PushRequest, PushResult, PushStep } from './push-types.js';

const MIN_FREE_KB = 1024 * 1024; // 1 GiB on the install filesystem

function q(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function exec(c: Client, cmd: string, timeoutMs: number): Promise<{ code: number; out: string; err: string }> {
  return new Promise((resolve, reject) => {
    c.exec(cmd, (e, stream) => {
      if (e) return reject(e);
      let out = '';
      let err = '';
      const t = setTimeout(() => { stream.close(); reject(new MobilityError('MOB_ERR_PUSH_INSTALL_FAILED', `a remote command did not finish within ${timeoutMs / 1000} s`)); }, timeoutMs);
      stream.on('data', (d: Buffer) => (out += d.toString()));
      stream.stderr.on('data', (d: Buffer) => (err += d.toString()));
      stream.on('close', (code: number | null) => { clearTimeout(t); resolve({ code: code ?? 255, out, err }); });
    });
  });
}

function sftp(c: Client): Promise<SFTPWrapper> {
  return new Promise((resolve, reject) => c.sftp((e, s) => (e ? reject(e) : resolve(s))));
}

/** Maps a preflight code reported by install.sh on the host to a push code. */
export function pushCodeFor(code: string): ErrorCode {
  switch (code) {
    case 'MOB_ERR_PRE_NOT_ROOT': return 'MOB_ERR_PUSH_NOT_ROOT';
    case 'MOB_ERR_PRE_OS_UNSUPPORTED': case 'MOB_ERR_PRE_NODE_VERSION': return 'MOB_ERR_PUSH_OS_UNSUPPORTED';
    case 'MOB_ERR_PRE_LOW_DISK': return 'MOB_ERR_PUSH_LOW_DISK';
    default: return 'MOB_ERR_PUSH_INSTALL_FAILED';
  }
}

function connectError(err: Error & { level?: string; code?: string }, host: string): MobilityError {
  if (err instanceof MobilityError) return err;
  if (err.level === 'client-authentication' || /authentication methods failed/i.test(err.message)) {
    return new MobilityError('MOB_ERR_PUSH_AUTH', `${host} refused the credentials: ${err.message}`);
  }
  if (/host key|hostVerifier|verification failed/i.test(err.message)) return new MobilityError('MOB_ERR_PUSH_HOST_KEY', `${host}: ${err.message}`);
  return new MobilityError('MOB_ERR_PUSH_UNREACHABLE', `cannot reach ${host} over SSH: ${err.message}`);
}

export class SshPushInstaller implements PushInstaller {
  constructor(private readonly o: {
    /** Resolves with the agent id once the host's agent registered and connected; null on timeout. */
    waitForRegistration?: (tokenId: string, timeoutMs: number) => Promise<string | null>;
    registrationTimeoutMs?: number;
    connectTimeoutMs?: number;
    installTimeoutMs?: number;
  } = {}) {}

  async install(h: PushHost, req: PushRequest, onStep?: (step: PushStep, detail?: string) => void): Promise<PushResult> {
    const t0 = Date.now();
    let step: PushStep = 'connect';
    const at = (s: PushStep, detail?: string) => { step = s; onStep?.(s, detail); };
    const c = new Client();
    let hostKeySeen = '';
    try {
      at('connect', `${h.user}@${h.host}:${h.port ?? 22}`);
      const cfg: ConnectConfig = {
        host: h.host, port: h.port ?? 22, username: h.user, readyTimeout: this.o.connectTimeoutMs ?? 15_000,
        hostVerifier: (key: Buffer) => {
          hostKeySeen = crypto.createHash('sha256').update(key).digest('base64').replace(/=+$/, '');
          return !h.hostKeySha256 || hostKeySeen === h.hostKeySha256.replace(/^SHA256:/, '').replace(/=+$/, '');
        },
      };
      if (h.privateKey) cfg.privateKey = h.privateKey;
      else if (h.keyFile) cfg.privateKey = await fsp.readFile(h.keyFile);
      else if (h.password !== undefined) cfg.password = h.password;
      else throw new MobilityError('MOB_ERR_USAGE', 'a push account needs a key file or a password');
      await new Promise<void>((resolve, reject) => {
        c.once('ready', () => resolve());
        c.once('error', (e) => reject(h.hostKeySha256 && hostKeySeen && hostKeySeen !== h.hostKeySha256.replace(/^SHA256:/, '').replace(/=+$/, '')
          ? new MobilityError('MOB_ERR_PUSH_HOST_KEY', `${h.host} presented host key SHA256:${hostKeySeen}, not the pinned SHA256:${h.hostKeySha256}`)
          : connectError(e, h.host)));
        c.connect(cfg);
      });

      at('preflight');
      const prefix = req.prefix ?? '/';
      const pre = await exec(c, [
        'echo "uid=$(id -u)"', 'echo "os=$(uname -s)"', 'echo "arch=$(uname -m)"',
        'echo "node=$(node -p process.versions.node 2>/dev/null || echo none)"',
        'echo "sudo=$(sudo -n true 2>/dev/null && echo yes || echo no)"',
        `d=${q(prefix)}; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; echo "free=$(df -Pk "$d" | awk 'NR==2{print $4}')"`,
        'echo "tmpfree=$(df -Pk /tmp | awk \'NR==2{print $4}\')"',
      ].join('; '), 30_000);
      const facts = Object.fromEntries(pre.out.split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1).trim()]));
      const sudo = facts.uid !== '0';
      if (sudo && facts.sudo !== 'yes') throw new MobilityError('MOB_ERR_PUSH_NOT_ROOT', `${h.user} on ${h.host} is not root and cannot sudo without a password; use root or grant NOPASSWD sudo for the install`);
      if (facts.os !== 'Linux' || !['x86_64', 'aarch64'].includes(facts.arch ?? '')) throw new MobilityError('MOB_ERR_PUSH_OS_UNSUPPORTED', `${h.host} runs ${facts.os} on ${facts.arch}; the Linux agent needs Linux on x86_64 or aarch64`);
      const nodeMajor = Number((facts.node ?? '').split('.')[0]);
      if (!(nodeMajor >= 20)) throw new MobilityError('MOB_ERR_PUSH_OS_UNSUPPORTED', `${h.host} has Node.js ${facts.node ?? 'none'}; the agent needs Node.js 20 or newer (apt-get install nodejs)`);
      const bundleKb = Math.ceil((await fsp.stat(req.bundle)).size / 1024);
      if (Number(facts.tmpfree) < bundleKb * 4) throw new MobilityError('MOB_ERR_PUSH_LOW_DISK', `${h.host} has ${facts.tmpfree} KiB free in /tmp; unpacking the bundle needs about ${bundleKb * 4} KiB`);
      if (Number(facts.free) < MIN_FREE_KB) throw new MobilityError('MOB_ERR_PUSH_LOW_DISK', `${h.host} has ${facts.free} KiB free under ${prefix}; the agent needs ${MIN_FREE_KB} KiB`);

      at('upload', `${Math.round(bundleKb / 1024)} MiB`);
      const dir = `/tmp/mobility-push-${crypto.randomBytes(6).toString('hex')}`;
      const s = await sftp(c);
      await new Promise<void>((resolve, reject) => s.mkdir(dir, { mode: 0o700 }, (e) => (e ? reject(e) : resolve())));
      try {
        const remoteBundle = `${dir}/${path.basename(req.bundle)}`;
        await new Promise<void>((resolve, reject) => s.fastPut(req.bundle, remoteBundle, { mode: 0o600 }, (e) => (e ? reject(e) : resolve())));
        await new Promise<void>((resolve, reject) => s.writeFile(`${dir}/token`, req.token + '\n', { mode: 0o600 }, (e) => (e ? reject(e) : resolve())));
        s.end();

        at('install');
        const r = await exec(c, `${sudo ? 'sudo -n ' : ''}bash -c ${q([
          `set -e; cd ${q(dir)}; tar xzf ${q(remoteBundle)}; b=$(ls -d mobility-agent-*/ | head -n 1)`,
          `"$b"install.sh --server ${q(req.serverUrl)} --token-file ${q(`${dir}/token`)} --pin ${q(req.serverFingerprint)} --prefix ${q(prefix)}`,
        ].join('; '))}`, this.o.installTimeoutMs ?? 600_000);
        const line = (r.out + '\n' + r.err).split('\n').reverse().find((l) => l.startsWith('MOBILITY-INSTALL '));
        if (r.code !== 0 || !line?.startsWith('MOBILITY-INSTALL ok')) {
          const m = /^MOBILITY-INSTALL fail (\S+) ?(.*)$/.exec(line ?? '');
          const tail = (r.err || r.out).trim().split('\n').slice(-8).join('\n');
          throw new MobilityError(m ? pushCodeFor(m[1]) : 'MOB_ERR_PUSH_INSTALL_FAILED', `install.sh on ${h.host} failed (exit ${r.code})${m ? `: ${m[1]} ${m[2]}` : ''}\n${tail}`);
        }
      } finally {
        await exec(c, `rm -rf ${q(dir)}`, 30_000).catch(() => undefined);
      }

      at('register');
      let agentId: string | null = null;
      if (this.o.waitForRegistration) {
        agentId = await this.o.waitForRegistration(req.token.split('.')[0], this.o.registrationTimeoutMs ?? 120_000);
        if (!agentId) throw new MobilityError('MOB_ERR_PUSH_REG_TIMEOUT', `the agent on ${h.host} was installed but did not connect to the server within ${(this.o.registrationTimeoutMs ?? 120_000) / 1000} s; see its log (var/log/mobility/agent.log)`);
      }
      at('done', agentId ?? undefined);
      return { host: h.host, ok: true, message: `installed${agentId ? `; registered as ${agentId}` : ''}`, step, agentId: agentId ?? undefined, ms: Date.now() - t0 };
    } catch (err) {
      const e = err instanceof MobilityError ? err : step === 'connect' ? connectError(err as Error, h.host) : toMobilityError(err, 'MOB_ERR_PUSH_INSTALL_FAILED');
      const code = e.code.startsWith('MOB_ERR_PUSH_') || e.code === 'MOB_ERR_USAGE' ? e.code : 'MOB_ERR_PUSH_INSTALL_FAILED';
      return { host: h.host, ok: false, code, message: e.message, step, ms: Date.now() - t0 };
    } finally {
      c.end();
    }
  }
}
