/**
 * A real qemu-storage-daemon for host-mode tests: serves temp images (qcow2 or raw) as block
 * nodes disk0, disk1, ... with a QMP socket and (unless nbd = false) an NBD server on a unix
 * socket with one writable export per disk (guest0, guest1, ...) that qemu-io writes to as a
 * guest would. Spawned through the cleanup helpers, so it dies with the test even on a timeout.
 * The tools are required: requireQemuTools() throws when one is missing (tests fail, never skip).
 */
import { execFileSync, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { Cleanup } from '../../cleanup.js';
import { sleep } from '../../helpers.js';

export const QEMU_TOOLS = ['qemu-storage-daemon', 'qemu-img', 'qemu-io', 'nbdinfo', 'nbdcopy'];

/** Throws naming every missing tool and its Debian package. */
export function requireQemuTools(env: NodeJS.ProcessEnv = process.env): void {
  const pkg: Record<string, string> = { 'qemu-storage-daemon': 'qemu-system-common', 'qemu-img': 'qemu-utils', 'qemu-io': 'qemu-utils', nbdinfo: 'libnbd-bin', nbdcopy: 'libnbd-bin' };
  const missing = QEMU_TOOLS.filter((c) => spawnSync('/bin/sh', ['-c', `command -v ${c}`], { env }).status !== 0);
  if (missing.length) throw new Error(`missing tools: ${missing.map((m) => `${m} (package ${pkg[m]})`).join(', ')}; scripts/test.sh installs them`);
}

export function createImage(file: string, format: 'qcow2' | 'raw', size: string): void {
  execFileSync('qemu-img', ['create', '-q', '-f', format, file, size]);
}

export interface DaemonDisk { image: string; format: 'qcow2' | 'raw' }

export class QemuDaemon {
  child: ChildProcess | null = null;
  stderr = '';
  readonly qmpSocket: string;
  readonly nbdSocket: string;
  /** A second QMP monitor for the test itself: QEMU serves one client per monitor socket, and the tracker holds the first. */
  readonly testQmpSocket: string;

  /** o.qmpSocket: where the (first) QMP socket goes (default DIR/qmp.sock; host-mode discovery tests put several daemons' sockets in one directory). */
  constructor(private readonly c: Cleanup, readonly dir: string, readonly disks: DaemonDisk[], readonly nbd = true, o: { qmpSocket?: string } = {}) {
    this.qmpSocket = o.qmpSocket ?? path.join(dir, 'qmp.sock');
    this.nbdSocket = path.join(dir, 'nbd.sock');
    this.testQmpSocket = path.join(dir, 'qmp-test.sock');
  }

  /** Starts the daemon and waits until its QMP socket exists. */
  async start(): Promise<void> {
    fs.rmSync(this.qmpSocket, { force: true });
    fs.rmSync(this.nbdSocket, { force: true });
    fs.rmSync(this.testQmpSocket, { force: true });
    const args: string[] = [];
    for (const [i, d] of this.disks.entries()) {
      args.push('--blockdev', `driver=file,filename=${d.image},node-name=file${i}`);
      args.push('--blockdev', `driver=${d.format},file=file${i},node-name=disk${i}`);
    }
    if (this.nbd) {
      args.push('--nbd-server', `addr.type=unix,addr.path=${this.nbdSocket}`);
      for (const i of this.disks.keys()) args.push('--export', `type=nbd,id=guest${i},node-name=disk${i},name=guest${i},writable=on`);
    }
    args.push('--chardev', `socket,path=${this.qmpSocket},server=on,wait=off,id=qmp0`, '--monitor', 'chardev=qmp0');
    args.push('--chardev', `socket,path=${this.testQmpSocket},server=on,wait=off,id=qmp1`, '--monitor', 'chardev=qmp1');
    const child = this.c.spawn('qemu-storage-daemon', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    this.child = child;
    this.stderr = '';
    child.stderr!.on('data', (d: Buffer) => { this.stderr += d.toString(); });
    const end = Date.now() + 15_000;
    while (!fs.existsSync(this.qmpSocket) || !fs.existsSync(this.testQmpSocket) || (this.nbd && !fs.existsSync(this.nbdSocket))) {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`qemu-storage-daemon exited at start: ${this.stderr}`);
      if (Date.now() > end) throw new Error(`qemu-storage-daemon did not create its sockets: ${this.stderr}`);
      await sleep(20);
    }
  }

  /** SIGTERM (QEMU stores persistent bitmaps and closes the images cleanly), or SIGKILL; waits for the exit. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((r) => child.once('exit', () => r()));
    child.kill(signal);
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`qemu-storage-daemon did not exit on ${signal}`)), 15_000); });
    try {
      await Promise.race([exited, late]);
    } finally {
      clearTimeout(timer);
    }
    this.child = null;
  }

  /** A guest write through export guest<i>: `qemu-io -c 'write -P pattern offset length'`. */
  write(disk: number, offset: number, length: number, pattern = 0x5a, exportName = `guest${disk}`, socket = this.nbdSocket): void {
    execFileSync('qemu-io', ['-f', 'raw', '-c', `write -P ${pattern} ${offset} ${length}`, `nbd+unix:///${exportName}?socket=${socket}`], { stdio: ['ignore', 'ignore', 'pipe'] });
  }
}

/**
 * A QMP monitor in front of QEMU's, for races a test cannot time otherwise: `before(text)` is
 * told of each piece the client sends as it arrives, and the piece goes on to QEMU, in order, once
 * that call has resolved (a test holds a command back there, or acts just before it); QEMU's
 * answers go straight back. Closed with
 * the test.
 */
export async function qmpProxy(t: { teardown(fn: () => unknown): void }, upstream: string, listen: string, before: (text: string) => Promise<void> | void): Promise<void> {
  const proxy = net.createServer((client) => {
    const up = net.connect(upstream);
    up.on('data', (b: Buffer) => client.write(b));
    let chain = Promise.resolve();
    client.on('data', (b: Buffer) => {
      // told at once (it sees what arrives behind a held command), forwarded in order
      const gate = Promise.resolve(before(b.toString()));
      chain = chain.then(() => gate).then(() => { up.write(b); }, () => { client.destroy(); });
    });
    client.on('close', () => up.destroy());
    up.on('error', () => client.destroy());
    client.on('error', () => up.destroy());
  });
  await new Promise<void>((r) => proxy.listen(listen, r));
  t.teardown(() => proxy.close());
}
