/**
 * Static files of the console, served by the server itself (no CDN): uPlot's script and
 * stylesheet from the uplot package in node_modules (a production dependency, so the
 * pull-install bundle has it too), the console's own script and stylesheet from strings.
 * Read once and kept in memory; answered with an ETag.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { createRequire } from 'node:module';
import { MobilityError } from '../../errors.js';
import { CLIENT_SCRIPT } from './client-script.js';
import { STYLES } from './styles.js';

interface Asset { type: string; body: Buffer; etag: string }

const require = createRequire(import.meta.url);

function asset(type: string, body: string | Buffer): Asset {
  const b = typeof body === 'string' ? Buffer.from(body) : body;
  return { type, body: b, etag: `"${crypto.createHash('sha256').update(b).digest('base64url').slice(0, 22)}"` };
}

const loaders: Record<string, () => Asset> = {
  'console.js': () => asset('text/javascript; charset=utf-8', CLIENT_SCRIPT),
  'console.css': () => asset('text/css; charset=utf-8', STYLES),
  'uPlot.iife.min.js': () => asset('text/javascript; charset=utf-8', fs.readFileSync(require.resolve('uplot/dist/uPlot.iife.min.js'))),
  'uPlot.min.css': () => asset('text/css; charset=utf-8', fs.readFileSync(require.resolve('uplot/dist/uPlot.min.css'))),
};

const cache = new Map<string, Asset>();

/** The asset of this name, read on first use; null for an unknown name. MOB_ERR_CONFIG when uplot is not installed. */
export function getAsset(name: string): Asset | null {
  const load = Object.prototype.hasOwnProperty.call(loaders, name) ? loaders[name] : undefined;
  if (!load) return null;
  let a = cache.get(name);
  if (!a) {
    try {
      a = load();
    } catch (err) {
      throw new MobilityError('MOB_ERR_CONFIG', `the console's ${name} cannot be read (${(err as Error).message}); is the uplot package installed (npm ci)?`);
    }
    cache.set(name, a);
  }
  return a;
}

/** Answers GET /console/assets/NAME; false when there is no such asset. */
export function serveAsset(req: IncomingMessage, res: ServerResponse, name: string): boolean {
  const a = getAsset(name);
  if (!a) return false;
  if (req.headers['if-none-match'] === a.etag) {
    res.writeHead(304, { etag: a.etag, 'cache-control': 'no-cache' });
    res.end();
    return true;
  }
  res.writeHead(200, { 'content-type': a.type, 'content-length': a.body.length, etag: a.etag, 'cache-control': 'no-cache', 'x-content-type-options': 'nosniff' });
  res.end(req.method === 'HEAD' ? undefined : a.body);
  return true;
}
