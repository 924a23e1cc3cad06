/**
 * The CLI's client of the server's operator API (JSON over the same HTTPS listener
 * and TLS identity as the replication endpoint): the connection options every
 * operator command takes (or the profile `mobility login` saved: profile.ts), a
 * request/answer call, and a streaming call that reads
 * a newline-delimited JSON answer line by line.
 */
import fsp from 'node:fs/promises';
import type { IncomingMessage } from 'node:http';
import net from 'node:net';
import path from 'node:path';
import type { TLSSocket } from 'node:tls';
import { DEFAULT_PORT } from '../constants.js';
import { MobilityError, isErrorCode } from '../errors.js';
import { describeCertError, isCertificateError, normalizeFingerprint } from '../transport/tls.js';
import { readSecretFile, type Values } from './args.js';
import { profileFile, readProfile, selectProfile } from './profile.js';

/**
 * Where the server is and how to authenticate to it. caFile names where ca came from (for
 * messages); both are absent with --pin alone or a ws:// server. profile names the profile the
 * token came from, trustFrom says the CA or pin came from it too (both for messages).
 */
export interface ApiConn { url: URL; token: string; ca?: string; caFile?: string; pin?: string; profile?: string; trustFrom?: string }

/** The connection options of every command that talks to the server's operator API (parseArgs). */
export const CONN_OPTIONS = {
  server: { type: 'string' }, 'data-dir': { type: 'string' }, 'token-file': { type: 'string' }, ca: { type: 'string' }, pin: { type: 'string' },
  profile: { type: 'string' },
} as const;

/** The help of the connection options, appended to the help of every operator command. */
export const CONN_HELP = `
Connection (the same for every command that talks to the server):
  --data-dir DIR         on the server: its token (DIR/token) and CA (DIR/tls/ca.pem)
  --token-file F         elsewhere: a copy of the server's DATA-DIR/token, with
  --ca F                 the server's CA (a copy of DATA-DIR/tls/ca.pem), or
  --pin SHA256           the fingerprint of the server certificate (printed at its start)
  --server URL           wss://HOST:PORT (ws:// for a --no-tls server); default wss://127.0.0.1:${DEFAULT_PORT}
  --profile NAME         without --data-dir and --token-file: the server, CA or pin and token saved
                         by 'mobility login' (default: $MOBILITY_PROFILE, else the profile 'default');
                         --server, --ca or --pin given as well replace the profile's
`;

/** What an operator command says when it was given no way to reach the server (and there is no default profile). */
export const NO_CONNECTION = 'no server connection given: pass --data-dir DIR (on the server) or --server URL --token-file F (--ca F | --pin SHA256), or save them once with mobility login';

/**
 * The connection of an operator command (status, points, test-failover, failover, reprotect,
 * token, machines, policy, enable, disable, cut, push-install), one rule for all of them:
 *   --data-dir DIR       on the server: the token DIR/token and the CA DIR/tls/ca.pem
 *                        (--token-file, --ca or --pin given as well take precedence)
 *   --token-file F       elsewhere, with --ca F or --pin SHA256 for a wss:// server
 *   --server URL         wss://HOST:PORT (ws:// for a --no-tls server); default wss://127.0.0.1:7443
 * Neither --data-dir nor --token-file: the profile saved by `mobility login` (profile.ts) named by
 * --profile, else $MOBILITY_PROFILE, else 'default'; --server, --ca or --pin given replace its
 * address or trust (--ca or --pin replaces both its CA and its pin). --profile with --data-dir or
 * --token-file is MOB_ERR_USAGE (two credentials); no default profile: MOB_ERR_USAGE saying what
 * to pass; a named profile that does not exist: MOB_ERR_CONFIG.
 */
export async function serverConn(v: Values): Promise<ApiConn> {
  if (v['data-dir'] !== undefined || v['token-file'] !== undefined) {
    if (v.profile !== undefined) throw new MobilityError('MOB_ERR_USAGE', `--profile ${String(v.profile)} and --${v['data-dir'] !== undefined ? 'data-dir' : 'token-file'} both give the credential: give one of them`);
    return resolveConn(v, true);
  }
  const sel = selectProfile(v);
  const p = await readProfile(sel.name);
  if (!p) {
    if (sel.from === 'default') throw new MobilityError('MOB_ERR_USAGE', `${NO_CONNECTION} (no profile '${sel.name}' at ${profileFile(sel.name)})`);
    throw new MobilityError('MOB_ERR_CONFIG', `no profile '${sel.name}' (named by ${sel.from}) at ${profileFile(sel.name)}: save it with mobility login --profile ${sel.name} --server URL --token-file F (--ca F | --pin SHA256); mobility profiles lists the saved ones`);
  }
  const url = serverUrl((v.server as string | undefined) ?? p.server);
  const own = v.ca === undefined && v.pin === undefined;
  const pin = own ? p.pin : checkPin(v.pin as string | undefined);
  const caFile = own ? undefined : v.ca as string | undefined;
  const ca = own ? p.ca : await readCa(caFile);
  if (url.protocol === 'wss:' && ca === undefined && pin === undefined) {
    throw new MobilityError('MOB_ERR_TLS_PIN', `refusing an unpinned TLS connection: profile ${p.name} has no CA nor pin for ${url.host}; give --ca F or --pin SHA256, or log in again`);
  }
  return { url, token: p.token, ca, caFile: caFile === undefined ? undefined : path.resolve(caFile), pin, profile: p.name, trustFrom: own ? `profile ${p.name}` : undefined };
}

/**
 * The connection of the agent-side commands (replicate, verify, protect): --server URL and
 * --token-file are required, with --ca or --pin for wss://; no --data-dir, no profile.
 */
export async function connOptions(v: Values): Promise<ApiConn> {
  return resolveConn(v, false);
}

/**
 * The connection given by options alone (operator: --data-dir allowed, --server defaulted; no
 * profile). `mobility login` checks and saves what this gives.
 */
export async function resolveConn(v: Values, operator: boolean): Promise<ApiConn> {
  const dataDir = operator && typeof v['data-dir'] === 'string' ? path.resolve(v['data-dir']) : undefined;
  const tokenOpt = v['token-file'] as string | undefined;
  if (operator && dataDir === undefined && tokenOpt === undefined) throw new MobilityError('MOB_ERR_USAGE', NO_CONNECTION);
  const server = (v.server as string | undefined) ?? (operator ? `wss://127.0.0.1:${DEFAULT_PORT}` : undefined);
  if (server === undefined) throw new MobilityError('MOB_ERR_USAGE', '--server wss://HOST:PORT is required (with --token-file F and --ca F or --pin SHA256)');
  const url = serverUrl(server);
  if (dataDir !== undefined) {
    try {
      await fsp.access(dataDir);
    } catch {
      throw new MobilityError('MOB_ERR_CONFIG', `no server data directory at ${dataDir}: give the directory 'mobility server --data-dir' uses (on the server machine), or connect from elsewhere with --server URL --token-file F --ca F`);
    }
  }
  let token: string;
  if (tokenOpt !== undefined || dataDir === undefined) {
    token = await readSecretFile(tokenOpt, 'token-file');
  } else {
    const file = path.join(dataDir, 'token');
    try {
      await fsp.access(file);
    } catch {
      throw new MobilityError('MOB_ERR_CONFIG', `${dataDir} is not a server data directory (it has no token file): give the directory 'mobility server --data-dir' uses`);
    }
    token = await readSecretFile(file, 'token-file');
  }
  const pin = checkPin(v.pin as string | undefined);
  const secure = url.protocol === 'wss:';
  const caFile = (v.ca as string | undefined) ?? (secure && pin === undefined && dataDir !== undefined ? path.join(dataDir, 'tls', 'ca.pem') : undefined);
  const ca = await readCa(caFile);
  if (secure && ca === undefined && pin === undefined) {
    throw new MobilityError('MOB_ERR_TLS_PIN', `refusing an unpinned TLS connection: give the server CA (--ca F) or certificate fingerprint (--pin SHA256)${operator ? ', or --data-dir DIR on the server' : ''}`);
  }
  return { url, token, ca, caFile: ca === undefined ? undefined : path.resolve(caFile!), pin };
}

/** --server (or a profile's server) as the URL of the replication endpoint; MOB_ERR_USAGE when it is no ws(s):// URL. */
function serverUrl(server: string): URL {
  let url: URL;
  try {
    url = new URL(server);
  } catch {
    throw new MobilityError('MOB_ERR_USAGE', `--server ${server} is not a URL: give wss://HOST:PORT (ws:// for a --no-tls server)`);
  }
  if (url.protocol !== 'wss:' && url.protocol !== 'ws:') throw new MobilityError('MOB_ERR_USAGE', `--server must be wss://HOST:PORT (ws:// for a --no-tls server), not ${server}`);
  if (url.pathname === '/' || url.pathname === '') url.pathname = '/v1/replicate';
  return url;
}

/** --pin, checked to be a SHA-256 fingerprint (MOB_ERR_USAGE otherwise). */
function checkPin(pin: string | undefined): string | undefined {
  if (pin !== undefined && normalizeFingerprint(pin).length !== 95) {
    throw new MobilityError('MOB_ERR_USAGE', `--pin wants the SHA-256 fingerprint of the server certificate (64 hex digits, colons optional), not ${pin}`);
  }
  return pin;
}

/** The CA file's text (undefined without one); MOB_ERR_CONFIG when it cannot be read. */
async function readCa(caFile: string | undefined): Promise<string | undefined> {
  if (caFile === undefined) return undefined;
  try { return await fsp.readFile(caFile, 'utf8'); } catch (err) { throw new MobilityError('MOB_ERR_CONFIG', `cannot read the CA ${caFile}: ${(err as Error).message}`); }
}

/**
 * A TLS connection to the server whose certificate passed the checks, before anything is sent:
 * with a CA, the chain must lead to it and the certificate must name the host of the URL; with a
 * pin, its SHA-256 fingerprint must be the pinned one (no name check); with both, both. A refused
 * certificate is MOB_ERR_TLS_PIN, a network failure MOB_ERR_UNREACHABLE.
 */
async function connectVerified(c: ApiConn): Promise<TLSSocket> {
  const tls = await import('node:tls');
  const host = c.url.hostname.replace(/^\[|\]$/g, '');
  const port = Number(c.url.port || 443);
  return new Promise((resolve, reject) => {
    const sock = tls.connect({
      host, port, servername: net.isIP(host) ? undefined : host, ca: c.ca, ALPNProtocols: ['http/1.1'],
      // verified below, so that every refusal gets its own message and code
      rejectUnauthorized: false, checkServerIdentity: () => undefined,
    });
    const fail = (err: MobilityError) => { sock.destroy(); reject(err); };
    const onError = (err: Error) => reject(connectionError(c, err));
    sock.once('error', onError);
    // a server that takes the TCP connection but never completes the handshake (stopped, wedged)
    const connectTimer = setTimeout(() => fail(new MobilityError('MOB_ERR_UNREACHABLE',
      `${c.url.host} did not complete a TLS handshake within ${Math.round(connectTimeoutMs() / 1000)} s (is the server stopped or overloaded?)`)), connectTimeoutMs());
    sock.once('close', () => clearTimeout(connectTimer));
    sock.once('secureConnect', () => {
      clearTimeout(connectTimer);
      if (c.ca !== undefined) {
        // Node sets authorizationError to OpenSSL's code (a string, whatever the typings say)
        const ae = sock.authorizationError as unknown as string | { code?: string } | null | undefined;
        const why = ae === null || ae === undefined ? null : typeof ae === 'string' ? ae : String(ae.code ?? ae);
        if (why !== null) {
          fail(new MobilityError('MOB_ERR_TLS_PIN', c.trustFrom
            ? `${describeCertError(why)} (${why}; the CA saved in ${c.trustFrom}): if the server's identity changed, log in again (mobility login --profile ${c.profile} ...)`
            : `${describeCertError(why)} (${why}; CA ${c.caFile ?? 'given'}): use the server's own DATA-DIR/tls/ca.pem, or --pin with the fingerprint it prints at start`));
          return;
        }
        const cert = sock.getPeerCertificate();
        const nameErr = tls.checkServerIdentity(host, cert);
        if (nameErr) {
          fail(new MobilityError('MOB_ERR_TLS_PIN', `the server certificate does not name ${host} (it names ${cert.subjectaltname ?? 'nothing'}): connect by one of those names, use --pin (no name check), or give the server the name with --san when its tls/ directory is created`, { cause: nameErr }));
          return;
        }
      }
      if (c.pin !== undefined) {
        const fp = sock.getPeerCertificate()?.fingerprint256 ?? '';
        if (fp !== normalizeFingerprint(c.pin)) {
          fail(new MobilityError('MOB_ERR_TLS_PIN', `the server certificate fingerprint ${fp || '(none)'} does not match ${c.trustFrom ? `the pin saved in ${c.trustFrom}` : '--pin'} ${normalizeFingerprint(c.pin)}`));
          return;
        }
      }
      // the request takes the socket over (with its own error listener) in the same turn
      sock.off('error', onError);
      resolve(sock);
    });
  });
}

/** A failed connection: a refused certificate (MOB_ERR_TLS_PIN) or the network (MOB_ERR_UNREACHABLE). */
function connectionError(c: ApiConn, err: Error): MobilityError {
  if (err instanceof MobilityError) return err;
  const code = (err as NodeJS.ErrnoException).code ?? '';
  if (isCertificateError(err)) return new MobilityError('MOB_ERR_TLS_PIN', `${describeCertError(code)}: ${err.message}`, { cause: err });
  const hint = c.url.protocol === 'wss:' && (code === 'EPROTO' || /wrong version number|packet length too long/i.test(err.message))
    ? ' (the server does not speak TLS there: is it a --no-tls server? then use ws://)'
    : c.url.protocol === 'ws:' && code === 'ECONNRESET' ? ' (if the server uses TLS, use wss://)' : '';
  return unreachable(c.url.host, err, hint);
}

/**
 * Sends the request; resolves with the response. Over TLS the bearer token goes out only on a
 * connection whose certificate passed the checks (connectVerified).
 */
async function request(c: ApiConn, method: string, pathname: string, body?: unknown): Promise<IncomingMessage> {
  const https = await import('node:https');
  const http = await import('node:http');
  const secure = c.url.protocol === 'wss:';
  if (secure && !c.ca && !c.pin) throw new MobilityError('MOB_ERR_TLS_PIN', 'refusing an unpinned TLS connection: give the server CA (--ca F) or certificate fingerprint (--pin SHA256)');
  const u = new URL(pathname, `${secure ? 'https' : 'http'}://${c.url.host}`);
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  const headers = { authorization: `Bearer ${c.token}`, ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}) };
  const sock = secure ? await connectVerified(c) : null;
  return new Promise((resolve, reject) => {
    const req = sock
      ? https.request({ host: u.hostname, port: Number(u.port || 443), path: u.pathname + u.search, method, headers, createConnection: () => sock }, resolve)
      : http.request(u, { method, headers }, resolve);
    req.on('error', (err) => reject(connectionError(c, err)));
    // nothing received for this long (no answer, no progress line): the server is stopped or
    // wedged; the CLI says so instead of waiting for ever
    const idle = apiIdleTimeoutMs();
    req.setTimeout(idle, () => req.destroy(new MobilityError('MOB_ERR_UNREACHABLE',
      `${c.url.host} sent nothing for ${Math.round(idle / 1000)} s during ${method} ${pathname} (MOBILITY_API_TIMEOUT_MS sets this bound)`)));
    req.end(payload);
  });
}

/** How long a TLS handshake may take (MOBILITY_CONNECT_TIMEOUT_MS, default 15 s). */
function connectTimeoutMs(): number {
  const v = Number(process.env.MOBILITY_CONNECT_TIMEOUT_MS);
  return Number.isFinite(v) && v > 0 ? v : 15_000;
}

/** How long a request may go without receiving anything (MOBILITY_API_TIMEOUT_MS, default 30 min: a boot check under emulation is slow). */
function apiIdleTimeoutMs(): number {
  const v = Number(process.env.MOBILITY_API_TIMEOUT_MS);
  return Number.isFinite(v) && v > 0 ? v : 30 * 60_000;
}

function unreachable(host: string, err: Error, hint = ''): MobilityError {
  return new MobilityError('MOB_ERR_UNREACHABLE', `cannot reach ${host}: ${err.message}${hint}`, { cause: err });
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

/** The coded error of an error answer ({code, message}); a refused profile token says how to renew it. */
function answerError(c: ApiConn, j: Record<string, unknown>, status: number | undefined): MobilityError {
  const code = typeof j.code === 'string' && isErrorCode(j.code) ? j.code : 'MOB_ERR_INTERNAL';
  const hint = code === 'MOB_ERR_AUTH' && c.profile !== undefined ? ` (the token saved in profile ${c.profile}: if the server's token changed, log in again with mobility login --profile ${c.profile} ...)` : '';
  return new MobilityError(code, `server: ${String(j.message ?? status)}${hint}`);
}

/** Calls the server's HTTP API (same address and TLS identity as the replication endpoint). */
export async function api(c: ApiConn, method: string, pathname: string, body?: unknown): Promise<Record<string, unknown>> {
  const res = await request(c, method, pathname, body);
  const j = await readJson(res, c.url.host);
  if ((res.statusCode ?? 500) >= 400) throw answerError(c, j, res.statusCode);
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
    if ((res.statusCode ?? 500) >= 400) throw answerError(c, await readJson(res, host), res.statusCode);
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
