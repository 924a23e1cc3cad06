/**
 * Token-bucket bandwidth limit, wrapped around a sender (not a flag inside it).
 * take(n) resolves when n bytes may go out. Burst = one second of rate.
 */
export class RateLimiter {
  private tokens: number;
  private last = Date.now();
  constructor(private readonly bytesPerSecond: number) {
    this.tokens = bytesPerSecond;
  }

  async take(n: number): Promise<void> {
    for (;;) {
      const now = Date.now();
      this.tokens = Math.min(this.bytesPerSecond, this.tokens + ((now - this.last) * this.bytesPerSecond) / 1000);
      this.last = now;
      if (this.tokens >= Math.min(n, this.bytesPerSecond)) {
        this.tokens -= n;
        return;
      }
      const wait = ((Math.min(n, this.bytesPerSecond) - this.tokens) * 1000) / this.bytesPerSecond;
      await new Promise((r) => setTimeout(r, Math.max(1, Math.ceil(wait))));
    }
  }
}
