/**
 * A few large buffers handed out again once their user is done with them. Each large
 * allocation is an ArrayBuffer outside V8's heap, and every 64 MB of those starts a full
 * mark of the heap: at a few hundred MiB/s of data frames that is dozens of collections a
 * second. Buffers from the pool are taken for one use and given back when it ended (for a
 * frame: when the socket has written it); one never given back is simply collected.
 *
 * A request under half the minimum size gets an exact-size buffer of its own, not a pooled
 * one (a small frame, say of zero blocks, must not pin a frame-sized buffer while it waits
 * in the socket: the credit window bounds bytes on the wire, not the buffers behind them),
 * and give() keeps only buffers of at least the minimum size. So what is held is at most
 * about twice the bytes waiting to be written, plus `keep` idle buffers.
 */
export class BufferPool {
  private readonly free: Buffer[] = [];

  /** minBytes: the smallest buffer allocated; keep: how many idle buffers are retained. */
  constructor(private readonly minBytes: number, private readonly keep: number) {}

  /** A buffer of at least n bytes (its contents are arbitrary). */
  take(n: number): Buffer {
    if (n < this.minBytes / 2) return Buffer.allocUnsafe(n);
    for (let i = this.free.length - 1; i >= 0; i--) {
      if (this.free[i].length >= n) return this.free.splice(i, 1)[0];
    }
    return Buffer.allocUnsafeSlow(Math.max(n, this.minBytes));
  }

  /** Gives back a buffer from take() (the whole buffer, not a slice of it). */
  give(buf: Buffer): void {
    if (buf.length < this.minBytes || this.free.length >= this.keep || this.free.includes(buf)) return;
    this.free.push(buf);
  }

  get idle(): number {
    return this.free.length;
  }
}
