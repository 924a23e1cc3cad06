/**
 * A QEMU Guest Agent (QGA) client over a unix socket: the host side of a VM's virtio-serial
 * channel to `qemu-ga` inside the guest (Proxmox: /var/run/qemu-server/<vmid>.qga; libvirt: the
 * org.qemu.guest_agent.0 channel's socket). Host mode uses it to freeze the guest's filesystems
 * for app-consistent points (src/agent/guest-agent-quiescer.ts).
 *
 * Protocol (QEMU's qga/qapi-schema.json): each command `{"execute": NAME, "arguments": {...}}`
 * is answered, in order, by `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`, one
 * JSON text per line. Unlike QMP there is no greeting and no capabilities negotiation, and the
 * stream may hold stale bytes: a previous client that timed out leaves its late answer (or half
 * of it) in the virtio-serial channel, and the agent may hold half a command of that client. So
 * a client resynchronises first: it sends a 0xFF byte (the agent's parser drops any partial
 * input, and answers it with a parse error), then `guest-sync-delimited` with a random id; the
 * agent answers with a 0xFF byte and then `{"return": id}`. Everything before the 0xFF (0xFF never
 * occurs in the agent's UTF-8 JSON), every answer and every line that is not JSON before the
 * answer carrying our id is discarded.
 *
 * A VM without a running agent still accepts the connection (QEMU owns the socket) and never
 * answers: every step has a timeout. Answers carry no id, so they are matched in order: a command
 * that timed out keeps its place, and its late answer is dropped when it comes. One command at a
 * time per connection: execute() sends the next command only when the previous one was answered
 * or timed out. The agent also serves one client at a time: keep connections short (connect,
 * commands, close).
 *
 * Contract: connect() resolves once the stream is in sync, or rejects with MOB_ERR_GUEST_AGENT
 * (socket missing, refused, no sync answer within the timeout). execute() rejects with a
 * GuestAgentCommandError (code MOB_ERR_GUEST_AGENT, plus the agent's error class and text) when
 * the agent refuses a command, with MOB_ERR_GUEST_AGENT on a timeout or a closed connection.
 * Nothing secret travels over the channel here (no guest-exec, no file or password commands).
 */
import net from 'node:net';
import crypto from 'node:crypto';
import { MobilityError } from '../../errors.js';
import { QmpLineParser } from './qmp.js';

export const QGA_DEFAULTS = {
  connectTimeoutMs: 5_000,
  commandTimeoutMs: 10_000,
  /** The agent's answers are small (guest-get-fsinfo of a big guest: some KiB); a longer line is a broken peer. */
  maxLineBytes: 4 * 1024 * 1024,
} as const;

const SENTINEL = 0xff;

/** The guest agent refused a command: `qgaClass` is its error class (GenericError, CommandNotFound, ...). */
export class GuestAgentCommandError extends MobilityError {
  readonly qgaClass: string;
  readonly desc: string;
  constructor(readonly command: string, qgaClass: string, desc: string) {
    // the guest's own text: bounded and without control characters before it reaches a log line
    const c = clean(qgaClass, 64);
    const d = clean(desc, 500);
    super('MOB_ERR_GUEST_AGENT', `guest agent command ${command} failed: ${c}: ${d}`);
    this.qgaClass = c;
    this.desc = d;
  }
}

export function guestAgentError(what: string, o?: { cause?: unknown; retryable?: boolean }): MobilityError {
  return new MobilityError('MOB_ERR_GUEST_AGENT', what, o);
}

/** guest-info: the agent's version and its commands (a disabled one was blocked by the guest's configuration). */
export interface GuestInfo { version: string; supported_commands: { name: string; enabled: boolean; 'success-response'?: boolean }[] }
/** guest-get-fsinfo, the fields used here. */
export interface GuestFsInfo { name: string; mountpoint: string; type: string }
export type FreezeStatus = 'thawed' | 'frozen';

export interface GuestAgentConnectOptions {
  /** Bound of the connection and the resynchronisation together. */
  timeoutMs?: number;
  /** Default bound of each command. */
  commandTimeoutMs?: number;
}

/** What the agent's byte stream yields: our sync's answer, or the answer to a command. */
export type GuestAgentEvent = { kind: 'synced' } | { kind: 'answer'; message: { return?: unknown; error?: { class?: string; desc?: string } } };

/**
 * The agent's byte stream as an explicit state machine, fed chunks of any size. After
 * expectSync(id) every byte up to a 0xFF sentinel is stale, and so is every answer or line that
 * is not JSON until `{"return": id}`; then answers are yielded in order. A line that is not JSON
 * outside a sync is a broken stream (coded error from `fail`).
 */
export class GuestAgentStream {
  private parser: QmpLineParser;
  private awaitingSentinel = false;
  private syncId: number | null = null;

  constructor(private readonly fail: (what: string, o?: { cause?: unknown }) => MobilityError, private readonly maxLine: number = QGA_DEFAULTS.maxLineBytes) {
    this.parser = new QmpLineParser(maxLine, fail);
  }

  /** A guest-sync-delimited with this id was sent: drop everything until its answer. */
  expectSync(id: number): void {
    this.syncId = id;
    this.awaitingSentinel = true;
  }

  get syncing(): boolean { return this.syncId !== null; }

  push(chunk: Buffer): GuestAgentEvent[] {
    let data = chunk;
    const s = data.lastIndexOf(SENTINEL);
    if (s >= 0) {
      // the agent's answer to a sync starts here: whatever came before is stale, partial lines included
      data = data.subarray(s + 1);
      this.parser = new QmpLineParser(this.maxLine, this.fail);
      this.awaitingSentinel = false;
    } else if (this.awaitingSentinel) {
      return [];
    }
    let msgs: unknown[];
    try {
      msgs = this.parser.push(data);
    } catch (err) {
      // still resynchronising: a stale half line joined to the agent's next one (the agent also
      // answers our 0xFF with a parse error) is stale by definition; the sync answer follows its
      // own sentinel, which resets the parser again
      if (this.syncId === null) throw err;
      this.parser = new QmpLineParser(this.maxLine, this.fail);
      return [];
    }
    const out: GuestAgentEvent[] = [];
    for (const m of msgs) {
      const message = (m !== null && typeof m === 'object' ? m : {}) as { return?: unknown; error?: { class?: string; desc?: string } };
      if (this.syncId !== null) {
        // after a sync only its own answer counts (a stale answer may even follow a stale sentinel)
        if (message.return === this.syncId) {
          this.syncId = null;
          out.push({ kind: 'synced' });
        }
        continue;
      }
      out.push({ kind: 'answer', message });
    }
    return out;
  }
}

interface Pending { command: string; resolve(v: unknown): void; reject(e: Error): void; timer: NodeJS.Timeout | null; timedOut: boolean }

export class GuestAgentClient {
  /** Resolves when the socket has closed (for any reason). */
  readonly closed: Promise<void>;
  /** Answers expected, in the order the commands were sent (timed-out ones stay until their answer comes). */
  private readonly queue: Pending[] = [];
  private readonly stream: GuestAgentStream;
  private syncWaiter: { resolve(): void; reject(e: Error): void } | null = null;
  private ended: Error | null = null;
  /** The command in flight (one at a time): the next execute() waits for it. */
  private turn: Promise<void> = Promise.resolve();

  private constructor(private readonly sock: net.Socket, readonly path: string, private readonly commandTimeoutMs: number, closed: Promise<void>) {
    this.closed = closed;
    this.stream = new GuestAgentStream((w, o) => guestAgentError(`the guest agent on ${this.path} sent ${w}`, o));
  }

  /** Connects and resynchronises (0xFF, guest-sync-delimited). Rejects with MOB_ERR_GUEST_AGENT. */
  static async connect(socketPath: string, o: GuestAgentConnectOptions = {}): Promise<GuestAgentClient> {
    const timeoutMs = o.timeoutMs ?? QGA_DEFAULTS.connectTimeoutMs;
    const sock = net.createConnection({ path: socketPath });
    let closedResolve!: () => void;
    const closed = new Promise<void>((r) => { closedResolve = r; });
    const client = new GuestAgentClient(sock, socketPath, o.commandTimeoutMs ?? QGA_DEFAULTS.commandTimeoutMs, closed);
    sock.on('data', (chunk: Buffer) => client.onData(chunk));
    sock.on('error', (err) => {
      const code = (err as NodeJS.ErrnoException).code;
      client.fail(guestAgentError(`guest agent socket ${socketPath}: ${code ? `${code} ` : ''}${err.message.replace(`${code} `, '')}`, { cause: err, retryable: true }));
    });
    sock.on('close', () => {
      client.fail(guestAgentError(`guest agent connection ${socketPath} closed (VM stopped, or the channel was taken by another client?)`, { retryable: true }));
      closedResolve();
    });
    try {
      await client.sync(timeoutMs);
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  /**
   * Resynchronises the stream: everything the agent sent before is dropped. Done by connect();
   * call it again after a command timed out if later answers must not wait for the late one.
   * A sync that gets no answer within timeoutMs closes the connection.
   */
  sync(timeoutMs = this.commandTimeoutMs): Promise<void> {
    if (this.ended) return Promise.reject(this.ended);
    const id = crypto.randomInt(1, 2 ** 31 - 1);
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.syncWaiter = null;
        reject(guestAgentError(`no answer to guest-sync-delimited from ${this.path} within ${timeoutMs} ms: is qemu-ga installed and running in the guest, the VM's guest agent channel enabled, and no other client holding the channel?`, { retryable: true }));
        this.close(); // out of sync for good: nothing it answers later could be trusted
      }, timeoutMs);
      this.syncWaiter = {
        resolve: () => { clearTimeout(timer); this.syncWaiter = null; resolve(); },
        reject: (e) => { clearTimeout(timer); this.syncWaiter = null; reject(e); },
      };
      // every answer still expected is now stale: its command is settled as lost
      for (const p of this.queue.splice(0)) this.settleLost(p);
      this.stream.expectSync(id);
      this.sock.write(Buffer.concat([Buffer.from([SENTINEL]), Buffer.from(JSON.stringify({ execute: 'guest-sync-delimited', arguments: { id } }) + '\n')]));
    });
  }

  /**
   * Runs one command and resolves with its `return` value, after the previous command was
   * answered or timed out. Rejects with GuestAgentCommandError when the agent refuses it, with
   * MOB_ERR_GUEST_AGENT on a timeout or a closed connection.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, o: { timeoutMs?: number } = {}): Promise<T> {
    const timeoutMs = o.timeoutMs ?? this.commandTimeoutMs;
    const run = this.turn.then(() => this.send<T>(command, args, timeoutMs));
    this.turn = run.then(() => undefined, () => undefined);
    return run;
  }

  private send<T>(command: string, args: Record<string, unknown> | undefined, timeoutMs: number): Promise<T> {
    if (this.ended) return Promise.reject(guestAgentError(`guest agent ${command}: ${this.ended.message}`, { retryable: true }));
    return new Promise<T>((resolve, reject) => {
      const p: Pending = { command, resolve: resolve as (v: unknown) => void, reject, timer: null, timedOut: false };
      p.timer = setTimeout(() => {
        p.timedOut = true; // keeps its place: its answer, if it ever comes, is the next one
        reject(guestAgentError(`guest agent command ${command} got no answer from ${this.path} within ${timeoutMs} ms`, { retryable: true }));
      }, timeoutMs);
      this.queue.push(p);
      this.sock.write(JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args }) + '\n');
    });
  }

  /** The connection has ended (closed by either side, or broken): every command now fails. */
  get isClosed(): boolean { return this.ended !== null; }

  /** Closes the connection (pending commands reject with MOB_ERR_GUEST_AGENT). Idempotent. */
  close(): void {
    this.fail(guestAgentError(`guest agent connection ${this.path} closed by us`));
    this.sock.destroy();
  }

  private onData(chunk: Buffer): void {
    let events: GuestAgentEvent[];
    try {
      events = this.stream.push(chunk);
    } catch (err) {
      this.fail(err as Error);
      this.sock.destroy();
      return;
    }
    for (const ev of events) {
      if (ev.kind === 'synced') { this.syncWaiter?.resolve(); continue; }
      const p = this.queue.shift();
      if (!p) continue; // an answer to nobody: dropped
      if (p.timedOut) continue;
      if (p.timer) clearTimeout(p.timer);
      const msg = ev.message;
      const e = msg.error;
      if (e) p.reject(new GuestAgentCommandError(p.command, typeof e.class === 'string' ? e.class : 'GenericError', typeof e.desc === 'string' ? e.desc : 'no description'));
      else p.resolve(msg.return);
    }
  }

  private settleLost(p: Pending): void {
    if (p.timer) clearTimeout(p.timer);
    if (!p.timedOut) p.reject(guestAgentError(`guest agent command ${p.command}: its answer was dropped by a resynchronisation`, { retryable: true }));
  }

  private fail(err: Error): void {
    if (this.ended) return;
    this.ended = err;
    for (const p of this.queue.splice(0)) {
      if (p.timer) clearTimeout(p.timer);
      if (!p.timedOut) p.reject(guestAgentError(`guest agent command ${p.command}: ${err.message}`, { cause: err, retryable: true }));
    }
    this.syncWaiter?.reject(err);
  }

  // ---- the commands host mode uses. The guest is not trusted (a compromised VM answers what it
  // likes): every answer is checked for shape, and what is kept from it is bounded.

  /** guest-ping: the agent is alive (resolves, or rejects coded). */
  async ping(o: { timeoutMs?: number } = {}): Promise<void> {
    await this.execute('guest-ping', undefined, o);
  }

  /** guest-info: version and commands (with whether each is enabled). */
  async info(o: { timeoutMs?: number } = {}): Promise<GuestInfo> {
    const v = await this.execute<unknown>('guest-info', undefined, o);
    const r = (v ?? {}) as { version?: unknown; supported_commands?: unknown };
    if (typeof r.version !== 'string' || !Array.isArray(r.supported_commands)) throw this.badAnswer('guest-info', v);
    const commands = (r.supported_commands as unknown[]).flatMap((c) => {
      const x = (c ?? {}) as { name?: unknown; enabled?: unknown; 'success-response'?: unknown };
      return typeof x.name === 'string' && typeof x.enabled === 'boolean' ? [{ name: x.name.slice(0, 128), enabled: x.enabled, 'success-response': x['success-response'] === true }] : [];
    }).slice(0, MAX_LIST);
    return { version: clean(r.version, 64), supported_commands: commands };
  }

  /** guest-get-fsinfo: the guest's mounted filesystems (entries that are not absolute, printable paths are left out). */
  async fsInfo(o: { timeoutMs?: number } = {}): Promise<GuestFsInfo[]> {
    const v = await this.execute<unknown>('guest-get-fsinfo', undefined, o);
    if (!Array.isArray(v)) throw this.badAnswer('guest-get-fsinfo', v);
    return (v as unknown[]).flatMap((f) => {
      const x = (f ?? {}) as { name?: unknown; mountpoint?: unknown; type?: unknown };
      if (typeof x.mountpoint !== 'string' || !isPrintablePath(x.mountpoint)) return [];
      return [{ name: typeof x.name === 'string' ? clean(x.name, 256) : '', mountpoint: x.mountpoint, type: typeof x.type === 'string' ? clean(x.type, 64) : '' }];
    }).slice(0, MAX_LIST);
  }

  /** guest-fsfreeze-status. */
  async freezeStatus(o: { timeoutMs?: number } = {}): Promise<FreezeStatus> {
    const s = await this.execute<unknown>('guest-fsfreeze-status', undefined, o);
    if (s !== 'thawed' && s !== 'frozen') throw this.badAnswer('guest-fsfreeze-status', s);
    return s;
  }

  /**
   * Freezes the guest's filesystems: all of them (guest-fsfreeze-freeze), or only the listed
   * mount points (guest-fsfreeze-freeze-list). Answers how many were frozen.
   */
  async freeze(mountpoints?: string[], o: { timeoutMs?: number } = {}): Promise<number> {
    const cmd = mountpoints ? 'guest-fsfreeze-freeze-list' : 'guest-fsfreeze-freeze';
    return this.count(cmd, await this.execute<unknown>(cmd, mountpoints ? { mountpoints } : undefined, o));
  }

  /** guest-fsfreeze-thaw: thaws every frozen filesystem of the guest; answers how many. */
  async thaw(o: { timeoutMs?: number } = {}): Promise<number> {
    return this.count('guest-fsfreeze-thaw', await this.execute<unknown>('guest-fsfreeze-thaw', undefined, o));
  }

  private count(command: string, v: unknown): number {
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw this.badAnswer(command, v);
    return v;
  }

  private badAnswer(command: string, v: unknown): MobilityError {
    return guestAgentError(`the guest agent on ${this.path} answered ${command} with something unexpected: ${clean(JSON.stringify(v) ?? String(v), 120)}`);
  }
}

/** Lists kept from an answer are cut at this length (a guest has far fewer commands or filesystems). */
const MAX_LIST = 1024;

/** Text from the guest for messages: control characters replaced, length bounded. */
function clean(s: string, max: number): string {
  const t = s.replace(/[\u0000-\u001f\u007f]/g, '?');
  return t.length > max ? `${t.slice(0, max)}...` : t;
}

/** An absolute path without control characters (they would break newline-separated lists such as hooks' MOBILITY_MOUNTS). */
export function isPrintablePath(p: string): boolean {
  return p.startsWith('/') && p.length <= 4096 && !/[\u0000-\u001f\u007f]/.test(p);
}
