/**
 * CSRF defence of the console's state-changing requests (every POST but the login):
 *
 *  - the request carries the session's CSRF token, in the `x-csrf-token` header (the console's
 *    scripts) or the `_csrf` form field (plain forms); compared in constant time;
 *  - a browser's Origin header, when sent, names this server (scheme, host and port as the
 *    request's Host); Sec-Fetch-Site, when sent, is same-origin.
 *
 * The session cookie is SameSite=Strict as well; these checks stand on their own without it.
 * (The pages send Referrer-Policy same-origin: with no-referrer, Chromium sends `Origin: null`
 * on a same-origin form post, which these checks would refuse.)
 */
import crypto from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import { MobilityError } from '../../errors.js';

export const CSRF_HEADER = 'x-csrf-token';
export const CSRF_FIELD = '_csrf';

/** Constant-time equality of two tokens of any length (compares their sha256). */
export function tokensEqual(expected: string, given: string | null | undefined): boolean {
  if (typeof given !== 'string' || given.length === 0 || given.length > 256) return false;
  const a = crypto.createHash('sha256').update(expected).digest();
  const b = crypto.createHash('sha256').update(given).digest();
  return crypto.timingSafeEqual(a, b);
}

/** Throws MOB_ERR_CSRF when the request comes from another origin (Origin or Sec-Fetch-Site say so). */
export function checkOrigin(req: IncomingMessage, scheme: 'https' | 'http'): void {
  const origin = req.headers.origin;
  if (origin !== undefined) {
    const host = req.headers.host;
    if (!host || origin !== `${scheme}://${host}`) throw new MobilityError('MOB_ERR_CSRF', `refused: the request comes from origin ${JSON.stringify(origin)}, not from this server`);
  }
  const site = req.headers['sec-fetch-site'];
  if (site !== undefined && site !== 'same-origin' && site !== 'none') throw new MobilityError('MOB_ERR_CSRF', `refused: a ${String(site)} request (Sec-Fetch-Site)`);
}

/** Throws MOB_ERR_CSRF unless the request is same-origin and carries the session's token (header, or the form field given). */
export function checkCsrf(req: IncomingMessage, scheme: 'https' | 'http', expected: string, formToken: string | null = null): void {
  checkOrigin(req, scheme);
  const h = req.headers[CSRF_HEADER];
  const given = typeof h === 'string' ? h : formToken;
  if (!tokensEqual(expected, given)) {
    throw new MobilityError('MOB_ERR_CSRF', given ? 'refused: the CSRF token does not match this session (reload the page)' : `refused: the request carries no CSRF token (the ${CSRF_HEADER} header or the ${CSRF_FIELD} form field)`);
  }
}
