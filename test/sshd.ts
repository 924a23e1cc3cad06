/**
 * A private sshd on 127.0.0.1 for push-install tests: its own host key, config
 * and authorized_keys, key login only. Needs openssh-server and openssh-client;
 * a missing tool fails the test (never skips).
 *
 * The "remote host" gets a private /tmp: sshd runs in its own mount namespace
 * (unshare -m) where /tmp is `remoteTmp`, a directory of the test's scratch root
 * (the scratch root itself stays reachable at its usual path). What a push leaves
 * in the host's /tmp (the upload directory with the bundle and the one-time token)
 * is then visible to this test only, never to a concurrent run, and is removed with
 * the scratch root even when the test is killed mid-push. Mounts the remote side
 * must see have to exist before startSshd (the namespace copies the mount table once).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import os from 'node:os';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import crypto from 'node:crypto';
import { cleanup, SCRATCH_BASE, type Cleanup } from './cleanup.js';

export interface TestSshd {
  port: number; userKey: string; hostKeySha256: string;
  /** the remote sessions' /tmp, as seen from the test */
  remoteTmp: string;
  stop(): Promise<void>;
}

export function findTool(name: string, pkg: string): string {
  for (const d of [...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/usr/local/sbin', '/sbin'].filter(Boolean)) {
    const p = path.join(d, name);
    try { fs.accessSync(p, fs.constants.X_OK); return p; } catch { /* next */ }
  }
  throw new Error(`this test needs '${name}': apt-get install --no-install-recommends ${pkg}`);
}

export function run(cmd: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0, stdout, stderr });
    });
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** Starts the sshd; it is registered with `scope` (default: the test process's scope), so it dies with the test even on a timeout. */
export async function startSshd(dir: string, scope: Cleanup = cleanup()): Promise<TestSshd> {
  const sshd = findTool('sshd', 'openssh-server');
  const keygen = findTool('ssh-keygen', 'openssh-client');
  await fsp.mkdir(dir, { recursive: true, mode: 0o755 });
  const hostKey = path.join(dir, 'host_ed25519');
  const userKey = path.join(dir, 'user_ed25519');
  for (const [f, c] of [[hostKey, 'host'], [userKey, 'user']]) {
    const r = await run(keygen, ['-q', '-t', 'ed25519', '-N', '', '-C', `mobility-test-${c}`, '-f', f]);
    if (r.code !== 0) throw new Error(`ssh-keygen failed: ${r.stderr}`);
  }
  const authorized = path.join(dir, 'authorized_keys');
  await fsp.writeFile(authorized, await fsp.readFile(userKey + '.pub'), { mode: 0o644 });
  await fsp.mkdir('/run/sshd', { recursive: true, mode: 0o755 }).catch(() => undefined);
  const unshare = findTool('unshare', 'util-linux');
  const remoteTmp = path.join(dir, 'remote-tmp');
  await fsp.mkdir(remoteTmp, { recursive: true });
  await fsp.chmod(remoteTmp, 0o1777);
  // in the namespace: keep the scratch base reachable under the new /tmp, then put remoteTmp over /tmp
  const tmp = os.tmpdir();
  const keep = SCRATCH_BASE.startsWith(tmp + '/') ? path.join(remoteTmp, path.relative(tmp, SCRATCH_BASE)) : '';
  const nsSetup = [
    'set -e',
    ...(keep ? [`mkdir -p '${keep}'`, `mount --rbind '${SCRATCH_BASE}' '${keep}'`] : []),
    `mount --rbind '${remoteTmp}' '${tmp}'`,
    'exec "$@"',
  ].join('; ');
  const pub = (await fsp.readFile(hostKey + '.pub', 'utf8')).trim().split(/\s+/)[1];
  const hostKeySha256 = crypto.createHash('sha256').update(Buffer.from(pub, 'base64')).digest('base64').replace(/=+$/, '');
  let lastErr = '';
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort();
    const config = path.join(dir, 'sshd_config');
    await fsp.writeFile(config, [
      `Port ${port}`, 'ListenAddress 127.0.0.1', `HostKey ${hostKey}`, `PidFile ${path.join(dir, 'sshd.pid')}`,
      `AuthorizedKeysFile ${authorized}`, 'PubkeyAuthentication yes', 'PasswordAuthentication no', 'KbdInteractiveAuthentication no',
      'PermitRootLogin prohibit-password', 'UsePAM no', 'StrictModes no', 'PrintMotd no', 'X11Forwarding no', 'LogLevel ERROR',
      'Subsystem sftp internal-sftp', '',
    ].join('\n'));
    const t = await run(sshd, ['-t', '-f', config]);
    if (t.code !== 0) throw new Error(`sshd -t failed: ${t.stderr}`);
    const child: ChildProcess = spawn(unshare, ['--mount', '--propagation', 'private', 'sh', '-c', nsSetup, 'sshd-ns', sshd, '-D', '-e', '-f', config], { stdio: ['ignore', 'ignore', 'pipe'] });
    scope.process(child);
    let err = '';
    child.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
    const deadline = Date.now() + 60_000; // a safety net, not a speed requirement
    let up = false;
    while (Date.now() < deadline && child.exitCode === null) {
      up = await new Promise<boolean>((r) => {
        const s = net.connect(port, '127.0.0.1', () => { s.destroy(); r(true); });
        s.once('error', () => r(false));
      });
      if (up) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    if (up && child.exitCode === null) {
      return {
        port, userKey, hostKeySha256, remoteTmp,
        stop: () => new Promise<void>((r) => {
          if (child.exitCode !== null || child.signalCode !== null) return r();
          const k = setTimeout(() => child.kill('SIGKILL'), 30_000);
          child.once('exit', () => { clearTimeout(k); r(); });
          child.kill('SIGTERM');
        }),
      };
    }
    child.kill('SIGTERM');
    lastErr = err;
    if (!/address already in use/i.test(err)) break;
  }
  throw new Error(`could not start a private sshd on 127.0.0.1: ${lastErr.trim()}`);
}
