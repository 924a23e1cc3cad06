/**
 * Agent side of one connection: TLS with a pinned CA or fingerprint, Hello /
 * Welcome handshake, credit-based flow control, heartbeats. A Connection is
 * used once; reconnecting makes a new one (see agent/replicator.ts).
 *
 * Events: 'ack' (Ack), 'digestReply' (DigestReply, payload), 'close' (MobilityError).
 */
import { EventEmitter } from 'node:events';
import WebSocket from 'ws';
import { HEARTBEAT_MAX_MISSED, LINK_BACKLOG_BYTES, PEER_BUSY_PCT, PROTOCOL_VERSION, SEND_QUEUE_BYTES, WS_MAX_PAYLOAD } from '../constants.js';
import { MobilityError, isErrorCode, toMobilityError } from '../errors.js';
import { decodeMessage, encodeMessage, type Ack, type CutAck, type CutRequest, type DecodedFrame, type ReadReply, type DigestReply, type Hello, type Welcome } from '../protocol/frame-codec.js';
import { normalizeFingerprint } from './tls.js';
import type { RateLimiter } from './rate-limiter.js';
import type { TLSSocket } from 'node:tls';

export interface ConnectOptions {
  url: string;
  /** PEM of the CA that signed the server certificate. */
  ca?: string;
  /** SHA-256 fingerprint of the server certificate (instead of, or on top of, ca). */
  pin?: string;
  /** The agent's client certificate and key (registered agents); PEM. */
  cert?: string;
  key?: string;
  hello: Omit<Hello, 'protocolVersion'>;
  connectTimeoutMs?: number;
  limiter?: RateLimiter;
}

export declare interface Connection {
  on(event: 'ack', l: (a: Ack) => void): this;
  on(event: 'digestReply', l: (r: DigestReply, payload: Buffer) => void): this;
  on(event: 'close', l: (err: MobilityError) => void): this;
  on(event: 'cutAck', l: (a: CutAck) => void): this;
  on(event: 'cutRequest', l: (r: CutRequest) => void): this;
  on(event: 'readReply', l: (r: ReadReply, payload: Buffer) => void): this;
}

/** The rule behind Connection.linkBusy (see there), apart for its tests. */
export function linkIsBottleneck(s: { limited: boolean; backlogBytes: number; peerBusyPct: number }): boolean {
  return s.limited || (s.backlogBytes >= LINK_BACKLOG_BYTES && s.peerBusyPct < PEER_BUSY_PCT);
}

export class Connection extends EventEmitter {
  private credit = 0;
  /** The server's load from its latest Ack that reported one (busy_pct; 0 until then, or with an older server). */
  private peerBusyPct = 0;
  private unwritten = 0;
  private creditWaiters: (() => void)[] = [];
  private closedErr: MobilityError | null = null;
  private lastRecv = Date.now();
  private hbTimer: NodeJS.Timeout | null = null;
  welcome!: Welcome;
  bytesSent = 0;

  private constructor(private readonly ws: WebSocket, private readonly limiter?: RateLimiter) {
    super();
    // one ack listener per disk's pass, plus a cut's wait for the last acks: many disks are not a leak
    this.setMaxListeners(0);
  }

  get closed(): MobilityError | null {
    return this.closedErr;
  }

  /** Connects, authenticates and returns once the Welcome arrived. Throws a coded MobilityError. */
  static connect(opts: ConnectOptions): Promise<Connection> {
    const secure = opts.url.startsWith('wss:');
    const ws = new WebSocket(opts.url, {
      maxPayload: WS_MAX_PAYLOAD,
      perMessageDeflate: false,
      // RFC 6455 masking guards caching proxies against script-built frames from browsers; this
      // client is not a browser and every byte is inside TLS, so an all-zero key (which ws treats
      // as "no XOR pass" on both ends) saves a pass over every byte sent.
      generateMask: (mask: Buffer) => { mask.fill(0); },
      handshakeTimeout: opts.connectTimeoutMs ?? 10_000,
      ...(secure ? { ca: opts.ca, rejectUnauthorized: opts.ca !== undefined, cert: opts.cert, key: opts.key } : {}),
    });
    if (secure && opts.ca === undefined && opts.pin === undefined) {
      ws.terminate();
      return Promise.reject(new MobilityError('MOB_ERR_TLS_PIN', 'refusing an unpinned TLS connection: give the server CA (--ca) or certificate fingerprint (--pin)'));
    }
    const conn = new Connection(ws, opts.limiter);
    return new Promise<Connection>((resolve, reject) => {
      let settled = false;
      const settle = (err: MobilityError | null) => {
        if (settled) return;
        settled = true;
        if (err) {
          conn.shutdown(err);
          reject(err);
        } else resolve(conn);
      };
      ws.on('upgrade', (res) => {
        if (!secure || opts.pin === undefined) return;
        const fp = (res.socket as TLSSocket).getPeerCertificate?.()?.fingerprint256 ?? '';
        if (fp !== normalizeFingerprint(opts.pin)) {
          settle(new MobilityError('MOB_ERR_TLS_PIN', `server certificate fingerprint ${fp || '(none)'} does not match the pinned one`));
        }
      });
      ws.on('open', () => {
        if (settled) return;
        ws.send(encodeMessage({ type: 'hello', hello: { ...opts.hello, protocolVersion: PROTOCOL_VERSION } }));
      });
      ws.on('message', (data, isBinary) => {
        conn.lastRecv = Date.now();
        let f: DecodedFrame;
        try {
          if (!isBinary) throw new MobilityError('MOB_ERR_FRAME_MALFORMED', 'server sent a text message');
          f = decodeMessage(data as Buffer);
        } catch (err) {
          const e = toMobilityError(err, 'MOB_ERR_FRAME_MALFORMED');
          if (!settled) settle(e);
          else conn.shutdown(e);
          return;
        }
        if (f.type === 'error') {
          const code = isErrorCode(f.error.code) ? f.error.code : 'MOB_ERR_INTERNAL';
          const e = new MobilityError(code, `server: ${f.error.message}`, { retryable: f.error.retryable });
          if (!settled) settle(e);
          else conn.shutdown(e);
          return;
        }
        if (!settled) {
          if (f.type === 'heartbeat') return; // a slow handshake (WAL replay on the server) is not an error
          if (f.type !== 'welcome') return settle(new MobilityError('MOB_ERR_HANDSHAKE', `expected welcome, got ${f.type}`));
          if (f.welcome.protocolVersion !== PROTOCOL_VERSION) {
            return settle(new MobilityError('MOB_ERR_PROTOCOL_VERSION', `server speaks protocol ${f.welcome.protocolVersion}, agent ${PROTOCOL_VERSION}`));
          }
          conn.welcome = f.welcome;
          conn.credit = f.welcome.creditBytes;
          conn.startHeartbeat(f.welcome.heartbeatMs);
          return settle(null);
        }
        // frames still buffered when the connection was shut down (a heartbeat timeout that fired
        // first after the process was stopped, say) are dropped: answering one would throw here
        if (conn.closedErr) return;
        conn.onFrame(f);
      });
      ws.on('error', (err) => {
        const e = /certificate|self.signed|unable to verify|altname/i.test(err.message)
          ? new MobilityError('MOB_ERR_TLS_PIN', `server certificate refused: ${err.message}`, { cause: err })
          : /1009|max payload/i.test(err.message)
            ? new MobilityError('MOB_ERR_FRAME_TOO_LARGE', err.message, { cause: err })
            : new MobilityError('MOB_ERR_UNREACHABLE', `connection to ${opts.url} failed: ${err.message}`, { cause: err });
        if (!settled) settle(e);
        else conn.shutdown(e);
      });
      ws.on('close', (code, reason) => {
        const r = reason.toString();
        const e = isErrorCode(r) ? new MobilityError(r, `server closed the connection (${r})`) : new MobilityError('MOB_ERR_UNREACHABLE', `connection closed (${code}${r ? ' ' + r : ''})`);
        if (!settled) settle(e);
        else conn.shutdown(conn.closedErr ?? e);
      });
    });
  }

  private startHeartbeat(ms: number): void {
    if (!(ms > 0)) return;
    this.hbTimer = setInterval(() => {
      if (Date.now() - this.lastRecv > ms * HEARTBEAT_MAX_MISSED) {
        this.shutdown(new MobilityError('MOB_ERR_HEARTBEAT_TIMEOUT', `no frame from the server for ${Date.now() - this.lastRecv} ms`));
        return;
      }
      this.send(encodeMessage({ type: 'heartbeat', heartbeat: { sentAtMs: Date.now(), reply: false } }));
    }, ms);
    this.hbTimer.unref();
  }

  private onFrame(f: DecodedFrame): void {
    switch (f.type) {
      case 'ack':
        this.credit += f.ack.creditBytes;
        // 0 means not reported (an older server): the last figure stands
        if (f.ack.busyPct) this.peerBusyPct = f.ack.busyPct;
        this.wakeCredit();
        this.emit('ack', f.ack);
        return;
      case 'digestReply':
        this.emit('digestReply', f.digestReply, f.payload);
        return;
      case 'cutAck':
        this.emit('cutAck', f.cutAck);
        return;
      case 'cutRequest':
        this.emit('cutRequest', f.cutRequest);
        return;
      case 'readReply':
        this.emit('readReply', f.readReply, f.payload);
        return;
      case 'heartbeat':
        if (!f.heartbeat.reply) this.send(encodeMessage({ type: 'heartbeat', heartbeat: { sentAtMs: f.heartbeat.sentAtMs, reply: true } }));
        return;
      default:
        this.shutdown(new MobilityError('MOB_ERR_UNKNOWN_MESSAGE', `server sent an unexpected ${f.type} frame`));
    }
  }

  private wakeCredit(): void {
    const w = this.creditWaiters;
    this.creditWaiters = [];
    for (const f of w) f();
  }

  /** Sends a control frame (no credit needed). Throws if the connection is closed. */
  send(buf: Buffer): void {
    if (this.closedErr) throw this.closedErr;
    this.ws.send(buf);
    this.bytesSent += buf.length;
  }

  /**
   * Whether the link is what holds shipping back (drives compress 'auto'): a bandwidth limit
   * is set, or at least LINK_BACKLOG_BYTES wait in this side's socket beyond the kernel's
   * buffers while the server says its event loop has time to spare. Bytes also pile up when
   * the server is too busy to read its socket; lz4 would then only add decode work there and
   * burn CPU here, on the protected machine, for no gain.
   */
  linkBusy(): boolean {
    return linkIsBottleneck({ limited: this.limiter !== undefined, backlogBytes: this.ws.bufferedAmount, peerBusyPct: this.peerBusyPct });
  }

  /** Sends a data frame once enough credit (and rate-limit budget) is available; `written` runs once the socket is done with buf (also when it failed), not at all if buf never went out. */
  async sendData(buf: Buffer, written?: () => void): Promise<void> {
    // credit, and no more than SEND_QUEUE_BYTES of data waiting in this process for the socket:
    // a control frame sent now (health, a cut, a digest request) is not stuck behind the whole
    // credit window on a slow link. Both are checked together after every wake.
    while (this.credit < buf.length || this.unwritten > SEND_QUEUE_BYTES) {
      if (this.closedErr) throw this.closedErr;
      await new Promise<void>((r) => this.creditWaiters.push(r));
    }
    if (this.limiter) await this.limiter.take(buf.length);
    if (this.closedErr) throw this.closedErr;
    this.credit -= buf.length;
    const n = buf.length;
    // ws calls back once the socket took the buffer, or with an error when it was destroyed first
    this.ws.send(buf, () => {
      this.unwritten -= n;
      try {
        if (written) written();
      } finally {
        this.wakeCredit();
      }
    });
    this.unwritten += n;
    this.bytesSent += n;
  }

  /** Data bytes handed to ws that the socket has not taken yet (at most about SEND_QUEUE_BYTES + one frame). */
  get unwrittenBytes(): number {
    return this.unwritten;
  }

  /** Closes with the given reason (or normally). Idempotent; emits 'close' once. */
  shutdown(err?: MobilityError): void {
    if (this.closedErr) return;
    this.closedErr = err ?? new MobilityError('MOB_ERR_UNREACHABLE', 'connection closed by the agent');
    if (this.hbTimer) clearInterval(this.hbTimer);
    try {
      if (this.ws.readyState === WebSocket.OPEN) this.ws.close(1000);
      else this.ws.terminate();
    } catch {
      /* already gone */
    }
    setTimeout(() => this.ws.terminate(), 1000).unref();
    this.wakeCredit();
    this.emit('close', this.closedErr);
  }
}
