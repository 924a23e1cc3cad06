/**
 * Live updates of open console pages: server-sent events on GET /console/live?page=...
 *
 * While at least one page is open, a tick (default every second) takes the status once,
 * renders the live fragments of every open view (pages.ts, the same code as the first answer)
 * and sends each page the fragments that changed since it last got them:
 *
 *   event: fragments   data: {"KEY": "<html>", ...}
 *   event: tick        data: {"now": ms}                 every tick (charts refresh on it)
 *   event: logout      data: {}                          the session ended: the page goes to the login
 *
 * A stream whose session expired or was logged out is ended. Streams are bounded (maxClients);
 * close() ends them all so the listener can stop.
 */
import type { ServerResponse } from 'node:http';
import { MobilityError } from '../../errors.js';
import type { ConsoleDeps } from './console-view.js';
import type { JobBoard } from './jobs.js';
import { fragments, type View } from './pages.js';
import type { SessionManager } from './sessions.js';

interface Client { res: ServerResponse; view: View; key: string; sessionId: string; sent: Record<string, string> }

export class LiveHub {
  private readonly clients = new Set<Client>();
  private timer: NodeJS.Timeout | null = null;
  private running = false;

  constructor(private readonly deps: ConsoleDeps, private readonly jobs: JobBoard, private readonly sessions: SessionManager,
    private readonly o: { intervalMs?: number; maxClients?: number } = {}) {}

  get size(): number { return this.clients.size; }

  open(res: ServerResponse, view: View, sessionId: string): void {
    if (this.clients.size >= (this.o.maxClients ?? 200)) throw new MobilityError('MOB_ERR_RATE_LIMITED', 'too many open console pages on this server; close some and reload');
    res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-store', 'x-accel-buffering': 'no' });
    res.write('retry: 2000\n\n');
    const c: Client = { res, view, key: JSON.stringify(view), sessionId, sent: {} };
    this.clients.add(c);
    const drop = () => { this.clients.delete(c); if (!this.clients.size) this.stopTimer(); };
    // the response's close (the browser went away); the request's own close comes as soon as its (empty) body is read
    res.once('close', drop);
    if (!this.timer) this.timer = setInterval(() => void this.tick(), this.o.intervalMs ?? 1000);
    void this.tick();
  }

  private stopTimer(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** One round: fragments of every open view, the changed ones sent. Ticks do not overlap. */
  private async tick(): Promise<void> {
    if (this.running || !this.clients.size) return;
    this.running = true;
    try {
      const status = await this.deps.status();
      const now = Date.now();
      const byView = new Map<string, Record<string, string>>();
      for (const c of [...this.clients]) {
        // an open page is not activity: the session still ends after its idle time without a request
        if (!this.sessions.alive(c.sessionId)) {
          c.res.end('event: logout\ndata: {}\n\n');
          this.clients.delete(c);
          continue;
        }
        let f = byView.get(c.key);
        if (!f) {
          f = await fragments(c.view, { server: this.deps.server, status, jobs: this.jobs, now });
          byView.set(c.key, f);
        }
        const changed: Record<string, string> = {};
        for (const [k, v] of Object.entries(f)) if (c.sent[k] !== v) { changed[k] = v; c.sent[k] = v; }
        if (Object.keys(changed).length) c.res.write(`event: fragments\ndata: ${JSON.stringify(changed)}\n\n`);
        c.res.write(`event: tick\ndata: ${JSON.stringify({ now })}\n\n`);
      }
    } catch (err) {
      this.deps.server.log.warn('console live update failed', { error: (err as Error).message });
    } finally {
      this.running = false;
      if (!this.clients.size) this.stopTimer();
    }
  }

  close(): void {
    this.stopTimer();
    for (const c of this.clients) c.res.end();
    this.clients.clear();
  }
}
