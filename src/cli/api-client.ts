/**
 * The CLI's client of the server's operator API (JSON over the same HTTPS listener
 * and TLS identity as the replication endpoint): the connection options every
 * operator command takes, a request/answer call, and a streaming call that reads
 * a newline-delimited JSON answer line by line.
 */
import fsp from 'node:fs/promises';
import type { IncomingMessage } from 'node:http';
import { MobilityError, isErrorCode } from '../errors.js';
import { readSecretFile, type Values } from './args.js';

/** Where the server is and how to authenticate to it (--server, --token-file, --ca / --pin). */
export interface ApiConn { url: URL; token: string; ca?: string; pin?: string }

/** The connection options of the agent-side commands: --server URL (required), --token-file, --ca or --pin. */
export async function connOptions(v: Values): Promise<ApiConn> {
  const server = v.server as string | undefined;
  if (!server || !/^wss?:\/\//.test(server)) throw new MobilityError('MOB_ERR_USAGE', '--server wss://HOST:PORT is required');
  const url = new URL(server);
  if (url.pathname === '/' || url.pathname === '') url.pathname = '/v1/replicate';
  const token = await readSecretFile(v['token-file'] as string | undefined, 'token-file');
  let ca: string | undefined;
  if (v.ca) {
    try { ca = await fsp.readFile(v.ca as string, 'utf8'); } catch (err) { throw new MobilityError('MOB_ERR_CONFIG', `cannot read --ca ${String(v.ca)}: ${(err as Error).message}`); }
  }
  return { url, token, ca, pin: v.pin as string | undefined };
}

/** Sends the request; resolves with the response once the server certificate passed the pin check. */
async function request(c: ApiConn, method: string, pathname: string, body?: unknown): Promise<IncomingMessage> {
  const https = await import('node:https');
  const http = await import('node:http');
  const secure = c.url.protocol === 'wss:';
  if (secure && !c.ca && !c.pin) throw new MobilityError('MOB_ERR_TLS_PIN', 'give the server CA (--ca) or certificate fingerprint (--pin)');
  const u = new URL(pathname, `${secure ? 'https' : 'http'}://${c.url.host}`);
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = (secure ? https : http).request(u, {
      method, headers: { authorization: `Bearer ${c.token}`, ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}) },
      ...(secure ? { ca: c.ca, rejectUnauthorized: c.ca !== undefined, checkServerIdentity: () => undefined } : {}),
    }, (res) => {
      if (secure && c.pin) {
        const fp = (res.socket as import('node:tls').TLSSocket).getPeerCertificate?.()?.fingerprint256 ?? '';
        if (fp.replace(/:/g, '').toLowerCase() !== c.pin.replace(/:/g, '').toLowerCase()) {
          res.destroy();
          reject(new MobilityError('MOB_ERR_TLS_PIN', `server certificate fingerprint ${fp} does not match the pinned one`));
          return;
        }
      }
      resolve(res);
    });
    req.on('error', (err) => reject(unreachable(u.host, err)));
    req.end(payload);
  });
}

function unreachable(host: string, err: Error): MobilityError {
  return new MobilityError('MOB_ERR_UNREACHABLE', `cannot reach ${host}: ${err.message}`, { cause: err });
}

/** The whole answer as a JSON object ({} when it is not JSON). */
function readJson(res: IncomingMessage, host: string): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    res.on('data', (d: Buffer) => parts.push(d));
    res.on('error', (err) => reject(unreachable(host, err)));
    res.on('end', () => {
      try { resolve(JSON.parse(Buffer.concat(parts).toString('utf8')) as Record<string, unknown>); } catch { resolve({}); }
    });
  });
}

/** The coded error of an error answer ({code, message}). */
function answerError(j: Record<string, unknown>, status: number | undefined): MobilityError {
  const code = typeof j.code === 'string' && isErrorCode(j.code) ? j.code : 'MOB_ERR_INTERNAL';
  return new MobilityError(code, `server: ${String(j.message ?? status)}`);
}

/** Calls the server's HTTP API (same address and TLS identity as the replication endpoint). */
export async function api(c: ApiConn, method: string, pathname: string, body?: unknown): Promise<Record<string, unknown>> {
  const res = await request(c, method, pathname, body);
  const j = await readJson(res, c.url.host);
  if ((res.statusCode ?? 500) >= 400) throw answerError(j, res.statusCode);
  return j;
}

/**
 * Calls an API endpoint that answers newline-delimited JSON (application/x-ndjson) and yields
 * each line as it arrives. An error status answers with a rejected iteration (as api() does);
 * a plain JSON answer (a server that does not stream this request) is yielded as one object.
 * A connection that breaks mid-answer ends the iteration with MOB_ERR_UNREACHABLE; what the
 * lines mean (progress, result, error) is the caller's.
 */
export async function* apiStream(c: ApiConn, method: string, pathname: string, body?: unknown): AsyncGenerator<Record<string, unknown>> {
  const host = c.url.host;
  const res = await request(c, method, pathname, body);
  try {
    if ((res.statusCode ?? 500) >= 400) throw answerError(await readJson(res, host), res.statusCode);
    if (!/ndjson/i.test(String(res.headers['content-type'] ?? ''))) {
      yield await readJson(res, host);
      return;
    }
    res.setEncoding('utf8');
    const parseLine = (line: string): Record<string, unknown> => {
      try {
        const j = JSON.parse(line) as unknown;
        if (j && typeof j === 'object' && !Array.isArray(j)) return j as Record<string, unknown>;
      } catch { /* below */ }
      throw new MobilityError('MOB_ERR_INTERNAL', `the server sent a line that is not a JSON object: ${line.slice(0, 200)}`);
    };
    let buf = '';
    const it = (res as AsyncIterable<string>)[Symbol.asyncIterator]();
    for (;;) {
      let r: IteratorResult<string>;
      try { r = await it.next(); } catch (err) { throw unreachable(host, err as Error); }
      if (r.done) break;
      buf += r.value;
      for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (line) yield parseLine(line);
      }
    }
    if (buf.trim()) yield parseLine(buf.trim());
  } finally {
    res.destroy();
  }
}

export function fmtAge(ms: number | null | undefined): string {
  if (ms === null || ms === undefined) return '-';
  if (ms < 1000) return `${ms} ms`;
  if (ms < 120_000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 7_200_000) return `${(ms / 60_000).toFixed(1)} min`;
  return `${(ms / 3_600_000).toFixed(1)} h`;
}
