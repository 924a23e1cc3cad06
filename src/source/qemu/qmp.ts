/**
 * A QMP (QEMU Machine Protocol) client over a unix socket: the control channel of host mode.
 *
 * Protocol (docs/interop/qmp-spec in QEMU): the server sends a greeting
 * `{"QMP": {"version": ..., "capabilities": [...]}}`; the client leaves capabilities
 * negotiation with `{"execute": "qmp_capabilities"}`; then each command
 * `{"execute": NAME, "arguments": {...}, "id": ID}` is answered by `{"return": ..., "id": ID}`
 * or `{"error": {"class": ..., "desc": ...}, "id": ID}`. Asynchronous events
 * `{"event": NAME, "data": {...}, "timestamp": {...}}` may arrive between answers at any time.
 * Every message is one JSON text followed by CRLF; JSON strings never hold a raw newline, so
 * the stream is split on "\n" (an explicit parser fed chunks of any size, bounded by
 * MAX_LINE_BYTES).
 *
 * Contract: connect() resolves once capabilities are negotiated, or rejects with MOB_ERR_QMP
 * (socket missing, refused, no greeting within the timeout). execute() may be called
 * concurrently; answers are matched by id. A command that gets no answer within its timeout
 * rejects with MOB_ERR_QMP (the connection stays usable: a late answer is dropped). A QMP error
 * answer rejects with a QmpCommandError (code MOB_ERR_QMP, plus the QMP error class). When
 * the socket closes (QEMU stopped or restarted), every pending command rejects with MOB_ERR_QMP
 * marked retryable, and `closed` resolves. Nothing secret travels over QMP here.
 */
import net from 'node:net';
import { EventEmitter } from 'node:events';
import { MobilityError } from '../../errors.js';

export const QMP_CONNECT_TIMEOUT_MS = 5_000;
export const QMP_COMMAND_TIMEOUT_MS = 30_000;
/** No QMP message we use comes near this; a longer line means a broken or hostile peer. */
export const MAX_LINE_BYTES = 16 * 1024 * 1024;

export interface QmpEvent { event: string; data: Record<string, unknown>; timestamp?: { seconds: number; microseconds: number } }

/** QEMU refused a command: `qmpClass` is QMP's error class (GenericError, DeviceNotFound, ...). */
export class QmpCommandError extends MobilityError {
  constructor(readonly command: string, readonly qmpClass: string, readonly desc: string) {
    super('MOB_ERR_QMP', `QMP command ${command} failed: ${qmpClass}: ${desc}`);
  }
}

function qmpError(what: string, o?: { cause?: unknown; retryable?: boolean }): MobilityError {
  return new MobilityError('MOB_ERR_QMP', what, o);
}

/**
 * Splits a byte stream into lines and parses each as JSON. Fed chunks of any size; a line
 * longer than maxLine (no newline yet) is an error. Returns parsed messages in order.
 */
export class QmpLineParser {
  private parts: Buffer[] = [];
  private pending = 0;
  /** `fail` makes the coded error of a broken stream (MOB_ERR_QMP here; the guest agent client passes its own). */
  constructor(private readonly maxLine = MAX_LINE_BYTES, private readonly fail: (what: string, o?: { cause?: unknown }) => MobilityError = (w, o) => qmpError(`QMP sent ${w}`, o)) {}

  push(chunk: Buffer): unknown[] {
    const out: unknown[] = [];
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(0x0a, start);
      if (nl < 0) break;
      const piece = chunk.subarray(start, nl);
      const line = this.pending ? Buffer.concat([...this.parts, piece]) : piece;
      this.parts = [];
      this.pending = 0;
      start = nl + 1;
      if (line.length > this.maxLine) throw this.fail(`a message longer than ${this.maxLine} bytes`);
      const text = line.toString('utf8').trim();
      if (!text) continue;
      try {
        out.push(JSON.parse(text));
      } catch (err) {
        throw this.fail(`a message that is not JSON: ${JSON.stringify(text.slice(0, 120))}`, { cause: err });
      }
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start);
      this.pending += rest.length;
      if (this.pending > this.maxLine) throw this.fail(`a message longer than ${this.maxLine} bytes`);
      this.parts.push(Buffer.from(rest)); // a copy: the socket may reuse its chunk
    }
    return out;
  }
}

interface Pending { command: string; resolve(v: unknown): void; reject(e: Error): void; timer: NodeJS.Timeout }

export interface QmpConnectOptions { timeoutMs?: number; commandTimeoutMs?: number }

export class QmpClient extends EventEmitter {
  /** QEMU's version from the greeting, e.g. "7.2.0". */
  readonly version: string;
  /** Resolves when the socket has closed (for any reason). */
  readonly closed: Promise<void>;
  private readonly pending = new Map<string, Pending>();
  private nextId = 1;
  private ended: Error | null = null;

  private constructor(private readonly sock: net.Socket, private readonly path: string, version: string, private readonly commandTimeoutMs: number, closed: Promise<void>) {
    super();
    this.version = version;
    this.closed = closed;
  }

  /** Connects, reads the greeting, negotiates capabilities. Rejects with MOB_ERR_QMP. */
  static async connect(socketPath: string, o: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = o.timeoutMs ?? QMP_CONNECT_TIMEOUT_MS;
    const parser = new QmpLineParser();
    const sock = net.createConnection({ path: socketPath });
    let client: QmpClient | null = null;
    let greet: ((v: { version: string }) => void) | null = null;
    let fail: ((e: Error) => void) | null = null;
    let closedResolve!: () => void;
    const closed = new Promise<void>((r) => { closedResolve = r; });
    const greeting = new Promise<{ version: string }>((resolve, reject) => { greet = resolve; fail = reject; });
    const timer = setTimeout(() => fail?.(qmpError(`no QMP greeting from ${socketPath} within ${timeoutMs} ms`, { retryable: true })), timeoutMs);
    sock.on('data', (chunk: Buffer) => {
      let msgs: unknown[];
      try {
        msgs = parser.push(chunk);
      } catch (err) {
        if (client) client.fail(err as Error); else fail?.(err as Error);
        sock.destroy();
        return;
      }
      for (const m of msgs) {
        if (client) { client.onMessage(m); continue; }
        const g = (m as { QMP?: { version?: { qemu?: { major: number; minor: number; micro: number } } } }).QMP;
        if (!g) { fail?.(qmpError(`${socketPath} did not greet as a QMP server`)); sock.destroy(); return; }
        const v = g.version?.qemu;
        greet?.({ version: v ? `${v.major}.${v.minor}.${v.micro}` : 'unknown' });
      }
    });
    sock.on('error', (err) => {
      const e = qmpError(`QMP socket ${socketPath}: ${(err as NodeJS.ErrnoException).code ?? ''} ${err.message}`.replace(/: +/, ': '), { cause: err, retryable: true });
      if (client) client.fail(e); else fail?.(e);
    });
    sock.on('close', () => {
      const e = qmpError(`QMP connection to ${socketPath} closed (QEMU stopped?)`, { retryable: true });
      if (client) client.fail(e); else fail?.(e);
      closedResolve();
    });
    let g: { version: string };
    try {
      g = await greeting;
    } catch (err) {
      sock.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
    client = new QmpClient(sock, socketPath, g.version, o.commandTimeoutMs ?? QMP_COMMAND_TIMEOUT_MS, closed);
    try {
      await client.execute('qmp_capabilities', undefined, { timeoutMs });
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  /**
   * Runs one command and resolves with its `return` value. Rejects with QmpCommandError when
   * QEMU refuses it, with MOB_ERR_QMP on a timeout or a closed connection.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, o: { timeoutMs?: number } = {}): Promise<T> {
    if (this.ended) return Promise.reject(qmpError(`QMP ${command}: ${this.ended.message}`, { retryable: true }));
    const id = `mob-${this.nextId++}`;
    const timeoutMs = o.timeoutMs ?? this.commandTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(qmpError(`QMP command ${command} got no answer from ${this.path} within ${timeoutMs} ms`, { retryable: true }));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.sock.write(JSON.stringify(args === undefined ? { execute: command, id } : { execute: command, arguments: args, id }) + '\n');
    });
  }

  /**
   * Resolves with the first event named `name` for which `match` holds, arriving after this
   * call; rejects with MOB_ERR_QMP after timeoutMs or when the connection closes. Register it
   * BEFORE running the command that causes the event.
   */
  waitEvent(name: string, match: (data: Record<string, unknown>) => boolean = () => true, timeoutMs = this.commandTimeoutMs): Promise<QmpEvent> {
    return new Promise<QmpEvent>((resolve, reject) => {
      const onEvent = (ev: QmpEvent) => {
        if (ev.event !== name || !match(ev.data)) return;
        done();
        resolve(ev);
      };
      const onEnd = (err: Error) => { done(); reject(err); };
      const timer = setTimeout(() => { done(); reject(qmpError(`no QMP event ${name} from ${this.path} within ${timeoutMs} ms`, { retryable: true })); }, timeoutMs);
      const done = () => { clearTimeout(timer); this.off('event', onEvent); this.off('end', onEnd); };
      if (this.ended) { done(); reject(this.ended); return; }
      this.on('event', onEvent);
      this.on('end', onEnd);
    });
  }

  /** The connection has ended (closed by either side, or broken): every command now fails. */
  get isClosed(): boolean { return this.ended !== null; }

  /** Closes the connection (pending commands reject with MOB_ERR_QMP). Idempotent. */
  close(): void {
    this.fail(qmpError(`QMP connection to ${this.path} closed by us`));
    this.sock.destroy();
  }

  private onMessage(m: unknown): void {
    const msg = m as { id?: unknown; return?: unknown; error?: { class?: string; desc?: string }; event?: string; data?: Record<string, unknown>; timestamp?: QmpEvent['timestamp'] };
    if (typeof msg.event === 'string') {
      this.emit('event', { event: msg.event, data: msg.data ?? {}, timestamp: msg.timestamp } satisfies QmpEvent);
      return;
    }
    if (typeof msg.id !== 'string') return; // an answer to nobody (e.g. a timed-out command's id was a string; others are not ours)
    const p = this.pending.get(msg.id);
    if (!p) return; // answered after its timeout
    this.pending.delete(msg.id);
    clearTimeout(p.timer);
    if (msg.error) p.reject(new QmpCommandError(p.command, msg.error.class ?? 'GenericError', msg.error.desc ?? 'no description'));
    else p.resolve(msg.return);
  }

  private fail(err: Error): void {
    if (this.ended) return;
    this.ended = err;
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      this.pending.delete(id);
      p.reject(qmpError(`QMP command ${p.command}: ${err.message}`, { cause: err, retryable: true }));
    }
    this.emit('end', err);
  }
}
