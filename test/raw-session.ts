/**
 * A raw replication session for server tests: frames sent and received one by one, as an
 * agent would, over a real WebSocket (TLS options: the server's CA, and an agent's client
 * certificate where the server wants one).
 */
import WebSocket from 'ws';
import { decodeMessage, encodeMessage, type DecodedFrame } from '../src/protocol/frame-codec.js';

export class RawSession {
  readonly ws: WebSocket;
  private readonly frames: DecodedFrame[] = [];
  private waiters: (() => void)[] = [];
  closed = false;
  constructor(url: string, tls: WebSocket.ClientOptions) {
    this.ws = new WebSocket(`${url}/v1/replicate`, tls);
    this.ws.on('error', () => undefined);
    this.ws.on('message', (d) => { this.frames.push(decodeMessage(d as Buffer)); this.wake(); });
    this.ws.on('close', () => { this.closed = true; this.wake(); });
  }
  private wake(): void { for (const w of this.waiters.splice(0)) w(); }
  open(): Promise<void> {
    return new Promise((resolve, reject) => { this.ws.once('open', () => resolve()); this.ws.once('error', reject); });
  }
  send(f: Parameters<typeof encodeMessage>[0], payload?: Buffer): void { this.ws.send(encodeMessage(f, payload)); }
  /** The next frame of a type, or an error frame (earlier ones of other types are skipped); null once the connection closed. */
  async next(type: DecodedFrame['type']): Promise<DecodedFrame | null> {
    for (;;) {
      const i = this.frames.findIndex((f) => f.type === type || f.type === 'error');
      if (i >= 0) return this.frames.splice(i, 1)[0];
      if (this.closed) return null;
      await new Promise<void>((r) => this.waiters.push(r));
    }
  }
}
