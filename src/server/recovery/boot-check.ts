/**
 * Boot check: boots recovered disk images under QEMU and watches the guest's serial console
 * until a marker appears (a login prompt, a systemd target, a line a hook prints), with a time
 * limit. The result is data, never an exception: booted in N s, or failed (timeout, QEMU
 * exited, aborted) with the last console lines.
 *
 * What boots is the image itself: the firmware (SeaBIOS) starts the boot disk's own
 * bootloader, which loads the kernel and initramfs from the image. Nothing is taken from
 * outside the image, so a broken bootloader, kernel or init fails the check. The guest must
 * send its console to the first serial port (console=ttyS0), as cloud images do.
 *
 * The disks are attached with snapshot=on: the guest's writes go to a temporary overlay QEMU
 * deletes when it exits, so the check leaves the images as they were materialised (with the
 * network mapping, if one was applied). Network: none (`-nic none`), or an isolated user-mode
 * network (`restrict=on`: no route out of the host) with one NIC per given MAC, so the guest
 * sees the MACs its configuration matches. `-no-reboot`: a guest that reboots or panics
 * (with panic=N) ends the check as failed, at once.
 *
 * Acceleration: KVM when the host allows it, else TCG (QEMU is given `-accel kvm -accel tcg`
 * and falls back by itself when KVM cannot start; which one ran is read from its warning), or
 * forced either way. A host whose /dev/kvm opens but cannot run guests (nested virtualisation
 * without what the firmware needs: QEMU reports "KVM internal error" and pauses the guest) is
 * caught too: under auto the check starts again under TCG (and later checks of this process go
 * to TCG at once); under kvm it is MOB_ERR_BOOT_CHECK.
 *
 * Who calls: test failover (http/api.ts), per machine; a recovery plan runner may call it per
 * machine too. Every run kills its QEMU (SIGKILL) before it returns, whatever happened.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import { MobilityError } from '../../errors.js';

export type BootBus = 'virtio' | 'nvme' | 'ide';
export type BootAccel = 'auto' | 'kvm' | 'tcg';

export interface BootCheckOptions {
  /** Disk images, the boot disk first. */
  images: string[];
  /** Regular expression (JavaScript syntax) a console line (or the prompt being written) must match. */
  marker: string;
  /** Time limit from QEMU's start to the marker. */
  timeoutMs: number;
  bus?: BootBus;
  accel?: BootAccel;
  /** 'none', or an isolated user-mode network with a NIC per MAC. */
  network?: { kind: 'none' } | { kind: 'isolated'; macs: string[] };
  memoryMb?: number;
  cpus?: number;
  /** The whole console is also written here (mode 0600). */
  consoleLog?: string;
  /** Called with each complete console line (progress). */
  onLine?: (line: string) => void;
  /** Ends the check (reason 'aborted'). */
  signal?: AbortSignal;
  /** Default qemu-system-x86_64 (found on PATH). */
  qemu?: string;
}

export interface BootCheckResult {
  ok: boolean;
  /** marker: reached; timeout: not within the limit; exited: QEMU stopped first (guest powered off, rebooted, panicked); aborted: cancelled. */
  reason: 'marker' | 'timeout' | 'exited' | 'aborted';
  /** Seconds from QEMU's start to the marker, or to the end of a failed check. */
  seconds: number;
  accel: 'kvm' | 'tcg';
  bus: BootBus;
  network: 'none' | 'isolated';
  marker: string;
  /** The console line that matched. */
  markerLine: string | null;
  /** The last console lines (at most TAIL_LINES), newest last. */
  tail: string[];
  consoleBytes: number;
  /** QEMU's exit code when it exited by itself. */
  exitCode: number | null;
  /** QEMU's own messages (stderr), trimmed. */
  qemuMessages: string;
  startedAt: string;
}

export const TAIL_LINES = 40;
export const DEFAULT_MARKER = String.raw`(^|\s)login:\s*$|Reached target .*(Multi-User System|Graphical Interface)`;
export const DEFAULT_BOOT_TIMEOUT_MS = 5 * 60_000;
/** Longest console line kept (a guest that never writes a newline cannot grow memory). */
const MAX_LINE = 4096;

const SETPRIV = ['/usr/bin/setpriv', '/bin/setpriv'].find((p) => fs.existsSync(p)) ?? null;
/** QEMUs running now: killed when this process exits, whatever the check was doing. */
const live = new Set<ChildProcess>();
process.once('exit', () => { for (const c of live) c.kill('SIGKILL'); });

/** Validates a marker expression (MOB_ERR_USAGE when it is not a regular expression). */
export function compileMarker(src: string): RegExp {
  if (src.length === 0 || src.length > 1000) throw new MobilityError('MOB_ERR_USAGE', 'the boot marker must be a regular expression of 1 to 1000 characters');
  try { return new RegExp(src); } catch (err) {
    throw new MobilityError('MOB_ERR_USAGE', `the boot marker is not a regular expression: ${(err as Error).message}`);
  }
}

/** Strips what a serial console adds around text: carriage returns, ANSI escapes, other control characters. */
function clean(s: string): string {
  return s.replace(/\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1bc/g, '').replace(/[\x00-\x08\x0b-\x1f\x7f]/g, '');
}

/** The QEMU command line of a check (exported for tests). */
export function qemuArgs(o: BootCheckOptions): string[] {
  const bus = o.bus ?? 'virtio';
  const accel = o.accel ?? 'auto';
  const args = ['-name', 'mobility-boot-check', '-nodefaults', '-no-user-config', '-machine', 'pc', '-display', 'none', '-monitor', 'none', '-serial', 'stdio', '-no-reboot',
    '-m', String(o.memoryMb ?? 1024), '-smp', String(o.cpus ?? 1)];
  if (accel === 'auto') args.push('-accel', 'kvm', '-accel', 'tcg');
  else args.push('-accel', accel);
  o.images.forEach((img, i) => {
    // the file name goes through QEMU's option parser: commas are doubled
    const file = img.replaceAll(',', ',,');
    if (bus === 'nvme') args.push('-drive', `file=${file},format=raw,if=none,id=d${i},snapshot=on`, '-device', `nvme,drive=d${i},serial=mobility${i},bootindex=${i}`);
    else if (bus === 'ide') args.push('-drive', `file=${file},format=raw,if=none,id=d${i},snapshot=on`, '-device', `ide-hd,drive=d${i},bootindex=${i}`);
    else args.push('-drive', `file=${file},format=raw,if=none,id=d${i},snapshot=on`, '-device', `virtio-blk-pci,drive=d${i},bootindex=${i}`);
  });
  const net = o.network ?? { kind: 'none' };
  if (net.kind === 'none' || net.macs.length === 0) args.push('-nic', 'none');
  else for (const mac of net.macs) args.push('-nic', `user,restrict=on,model=virtio-net-pci,mac=${mac}`);
  return args;
}

/**
 * Boots the images and watches the console (see the file comment). Rejects only when the check
 * cannot run (MOB_ERR_BOOT_CHECK: no image, QEMU missing or refusing its arguments at once);
 * every guest outcome is a result.
 */
export async function bootCheck(o: BootCheckOptions): Promise<BootCheckResult> {
  const marker = compileMarker(o.marker);
  if (!o.images.length) throw new MobilityError('MOB_ERR_BOOT_CHECK', 'a boot check needs at least one disk image');
  for (const img of o.images) {
    const st = await fsp.stat(img).catch(() => null);
    if (!st?.isFile() && !st?.isBlockDevice()) throw new MobilityError('MOB_ERR_BOOT_CHECK', `cannot boot ${img}: not a local image file`);
  }
  const started = Date.now();
  // the console log: at most CONSOLE_LOG_MAX bytes (a guest printing without end must not fill the
  // server's disk), and a write error (a full disk) only ends the log, never the server
  const stream = o.consoleLog ? fs.createWriteStream(o.consoleLog, { mode: 0o600 }) : null;
  stream?.on('error', () => undefined);
  let logged = 0;
  const log = stream ? {
    write(d: Buffer): void {
      if (logged >= CONSOLE_LOG_MAX || stream.destroyed) return;
      const part = d.length <= CONSOLE_LOG_MAX - logged ? d : d.subarray(0, CONSOLE_LOG_MAX - logged);
      logged += part.length;
      stream.write(part);
      if (logged >= CONSOLE_LOG_MAX) stream.write(`\n[console log truncated at ${CONSOLE_LOG_MAX} bytes]\n`);
    },
    end(): void { stream.end(); },
  } : null;
  try {
    let accel = o.accel ?? 'auto';
    if (accel === 'auto' && kvmBroken) accel = 'tcg';
    let r = await bootOnce(o, marker, accel, o.timeoutMs, log);
    if (r.kvmFailed) {
      const why = r.qemuMessages.split('\n').find((l) => KVM_FAILURE.test(l)) ?? 'KVM internal error';
      if (accel === 'kvm') throw new MobilityError('MOB_ERR_BOOT_CHECK', `KVM could not run the guest on this server (${why.trim()}); use --boot-accel tcg (or auto)`);
      // /dev/kvm opened, but KVM cannot run guests here (nested virtualisation without the features SeaBIOS needs)
      kvmBroken = true;
      const first = r;
      r = await bootOnce(o, marker, 'tcg', Math.max(1000, o.timeoutMs - (Date.now() - started)), log);
      r.qemuMessages = `KVM could not run the guest (${why.trim()}); booted again under TCG\n${r.qemuMessages}`;
      r.startedAt = first.startedAt;
    }
    const { kvmFailed: _k, ...result } = r;
    return result;
  } finally {
    log?.end();
  }
}

/** Bytes of a guest's console kept in its log file (the rest is counted in consoleBytes only). */
export const CONSOLE_LOG_MAX = 16 * 1024 * 1024;

/** KVM failed to run a guest in this process: later 'auto' checks go straight to TCG. */
let kvmBroken = false;
/** What QEMU prints when KVM stops the guest (the VM stays paused: QEMU does not exit by itself). */
const KVM_FAILURE = /KVM internal error|emulation failure|kvm run failed/i;

/** One QEMU run of a check; kvmFailed: KVM stopped the guest (only with accel kvm or auto). */
async function bootOnce(o: BootCheckOptions, marker: RegExp, accel: BootAccel, timeoutMs: number, log: { write(d: Buffer): void } | null): Promise<BootCheckResult & { kvmFailed: boolean }> {
  const qemu = o.qemu ?? 'qemu-system-x86_64';
  const started = Date.now();
  const startedAt = new Date(started).toISOString();
  const args = qemuArgs({ ...o, accel });
  // setpriv --pdeathsig: QEMU dies with this process even when it is killed with -9
  const child = SETPRIV && !o.qemu
    ? spawn(SETPRIV, ['--pdeathsig', 'SIGKILL', '--', qemu, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    : spawn(qemu, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  child.once('exit', () => live.delete(child));
  const tail: string[] = [];
  let partial = '';
  let bytes = 0;
  let stderr = '';
  let markerLine: string | null = null;
  let kvmFailed = false;
  const push = (line: string) => {
    tail.push(line);
    if (tail.length > TAIL_LINES) tail.shift();
    try { o.onLine?.(line); } catch { /* a progress listener cannot stop the check */ }
  };
  return new Promise((resolve, reject) => {
    let settled = false;
    let exitCode: number | null = null;
    const finish = (reason: BootCheckResult['reason'], err?: Error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      o.signal?.removeEventListener('abort', onAbort);
      child.stdout.removeAllListeners('data');
      // always: whatever the outcome, QEMU does not outlive the check
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      const done = () => {
        if (partial.trim()) push(partial);
        if (err) { reject(err); return; }
        const ran: 'kvm' | 'tcg' = accel === 'tcg' || (accel !== 'kvm' && /fall(ing)? ?back|failed to initialize kvm|Could not access KVM|kvm.*(No such|Permission)/i.test(stderr)) ? 'tcg' : 'kvm';
        resolve({
          ok: reason === 'marker', reason, seconds: Math.round((Date.now() - started) / 100) / 10, accel: ran, bus: o.bus ?? 'virtio',
          network: (o.network?.kind ?? 'none') === 'isolated' ? 'isolated' : 'none', marker: o.marker, markerLine, tail: [...tail], consoleBytes: bytes,
          exitCode, qemuMessages: stderr.trim().slice(-2000), startedAt, kvmFailed,
        });
      };
      if (child.exitCode !== null || child.signalCode !== null) done();
      else child.once('close', done);
    };
    const timer = setTimeout(() => finish('timeout'), timeoutMs);
    const onAbort = () => finish('aborted');
    if (o.signal?.aborted) { finish('aborted'); return; }
    o.signal?.addEventListener('abort', onAbort);
    child.on('error', (err: NodeJS.ErrnoException) => {
      finish('exited', new MobilityError('MOB_ERR_BOOT_CHECK', err.code === 'ENOENT'
        ? `${qemu} is not installed (Debian: apt-get install qemu-system-x86); the boot check needs it`
        : `cannot start ${qemu}: ${err.message}`));
    });
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (d: string) => {
      stderr = (stderr + d).slice(-16_384);
      if (accel !== 'tcg' && KVM_FAILURE.test(stderr)) { kvmFailed = true; finish('exited'); }
    });
    child.stdout.on('data', (d: Buffer) => {
      bytes += d.length;
      log?.write(d);
      partial += clean(d.toString('latin1'));
      let i: number;
      while ((i = partial.indexOf('\n')) >= 0) {
        const line = partial.slice(0, i);
        partial = partial.slice(i + 1);
        push(line);
        if (marker.test(line)) { markerLine = line; finish('marker'); return; }
      }
      if (partial.length > MAX_LINE) { push(partial); partial = ''; }
      // a prompt ("login: ") is written without a newline
      if (partial && marker.test(partial)) { markerLine = partial; finish('marker'); }
    });
    child.on('exit', (code) => {
      exitCode = code;
      // QEMU that fails on its arguments exits at once with a message and no console at all
      if (!settled && bytes === 0 && code !== 0) {
        finish('exited', new MobilityError('MOB_ERR_BOOT_CHECK', /No such file/i.test(stderr) && /execute|exec/i.test(stderr)
          ? `${qemu} is not installed (Debian: apt-get install qemu-system-x86); the boot check needs it`
          : `QEMU refused to start the boot check (exit ${code}): ${stderr.trim().slice(-1000)}`));
        return;
      }
      // let the last console bytes arrive before judging
      child.stdout.once('close', () => finish('exited'));
      if (child.stdout.closed) finish('exited');
    });
  });
}

/** One line describing a result, for logs and the CLI. */
export function describeBootCheck(r: BootCheckResult): string {
  if (r.ok) return `booted in ${r.seconds} s (${r.accel}, ${r.bus}): ${JSON.stringify(r.markerLine)}`;
  const why = r.reason === 'timeout' ? `no marker within ${r.seconds} s` : r.reason === 'aborted' ? 'aborted' : `QEMU exited (code ${r.exitCode}) after ${r.seconds} s before the marker`;
  return `did not boot (${r.accel}, ${r.bus}): ${why}`;
}
