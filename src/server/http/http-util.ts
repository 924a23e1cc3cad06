/**
 * Small pieces every HTTP handler of the server shares: JSON answers, the bounded
 * JSON body reader, the HTTP status of each error code, and the bearer-token check.
 */
import crypto from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { MobilityError } from '../../errors.js';

export const MAX_BODY = 64 * 1024;

export function send(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body, null, 1) + '\n');
}

export function statusFor(code: string): number {
  switch (code) {
    case 'MOB_ERR_AUTH': case 'MOB_ERR_PASSPHRASE': case 'MOB_ERR_TOKEN_USED': case 'MOB_ERR_SESSION': return 401;
    case 'MOB_ERR_FORBIDDEN': case 'MOB_ERR_CLONE': case 'MOB_ERR_NOT_REGISTERED': case 'MOB_ERR_CSRF': return 403;
    case 'MOB_ERR_RATE_LIMITED': return 429;
    case 'MOB_ERR_UNKNOWN_MACHINE': case 'MOB_ERR_UNKNOWN_VM': case 'MOB_ERR_UNKNOWN_POLICY': case 'MOB_ERR_UNKNOWN_GROUP': case 'MOB_ERR_UNKNOWN_PLAN': return 404;
    case 'MOB_ERR_PLAN': return 400;
    case 'MOB_ERR_GROUP_TOO_LARGE': return 400;
    case 'MOB_ERR_GROUP_BUSY': return 409;
    // a group cut aborted (the machine at fault is named) or a group point incomplete
    case 'MOB_ERR_GROUP_CUT': return 502;
    case 'MOB_ERR_AGENT_OFFLINE': return 503;
    case 'MOB_ERR_PREFLIGHT': return 412;
    case 'MOB_ERR_USAGE': case 'MOB_ERR_CONFIG': case 'MOB_ERR_BAD_DISK_ID': case 'MOB_ERR_NETWORK_MAP': return 400;
    // the recovered image cannot take the mapping (no root filesystem, no known network stack)
    case 'MOB_ERR_IMAGE_MOUNT': case 'MOB_ERR_GUEST_NETWORK': return 422;
    case 'MOB_ERR_UNKNOWN_POINT': case 'MOB_ERR_UNKNOWN_DISK': return 404;
    case 'MOB_ERR_FAILED_OVER': case 'MOB_ERR_DISK_BUSY': case 'MOB_ERR_NOT_PROTECTING': case 'MOB_ERR_AGENT_EXISTS': return 409;
    // mobility cut: the agent's cut failed, or no point came in time
    case 'MOB_ERR_FREEZE': case 'MOB_ERR_HOOK': case 'MOB_ERR_CUT': case 'MOB_ERR_POINT_UNVERIFIED': case 'MOB_ERR_TRACKING_LOST': return 502;
    case 'MOB_ERR_CUT_TIMEOUT': return 504;
    default: return 500;
  }
}

export function authorized(token: string, req: IncomingMessage): boolean {
  const m = /^Bearer (.+)$/.exec(req.headers.authorization ?? '');
  if (!m) return false;
  const a = crypto.createHash('sha256').update(m[1]).digest();
  const b = crypto.createHash('sha256').update(token).digest();
  return crypto.timingSafeEqual(a, b);
}

export async function readBody(req: IncomingMessage): Promise<Record<string, unknown>> {
  let size = 0;
  const parts: Buffer[] = [];
  for await (const c of req) {
    size += (c as Buffer).length;
    if (size > MAX_BODY) throw new MobilityError('MOB_ERR_USAGE', `request body over ${MAX_BODY} bytes`);
    parts.push(c as Buffer);
  }
  try {
    const v = JSON.parse(Buffer.concat(parts).toString('utf8') || '{}') as unknown;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
    return v as Record<string, unknown>;
  } catch (err) {
    throw new MobilityError('MOB_ERR_USAGE', `request body is not a JSON object: ${(err as Error).message}`);
  }
}

