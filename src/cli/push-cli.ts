/**
 * `mobility push-install`: many hosts in parallel, one line of progress per
 * host on a terminal (JSON lines otherwise), a result per host at the end.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { MobilityError } from '../errors.js';
import { EXIT, parseDuration, readSecretFile, type Values } from './args.js';
import { api, type ApiConn } from './api-client.js';
import type { PushHost, PushResult, PushStep } from '../install/push-types.js';

async function findBundle(given: string | undefined): Promise<string> {
  if (given) {
    await fsp.access(given).catch(() => { throw new MobilityError('MOB_ERR_CONFIG', `no bundle at ${given} (build it with npm run package)`); });
    return path.resolve(given);
  }
  const dir = path.resolve('dist/bundle');
  const found = (await fsp.readdir(dir).catch(() => [] as string[])).filter((f) => /^mobility-agent-.*\.tar\.gz$/.test(f)).sort();
  if (!found.length) throw new MobilityError('MOB_ERR_CONFIG', `no bundle in ${dir}: build one with npm run package, or give --bundle`);
  return path.join(dir, found[found.length - 1]);
}

function parseHost(spec: string, defPort: number): { host: string; port: number } {
  const m = /^\[?([^\]]+?)\]?(?::(\d+))?$/.exec(spec.trim());
  if (!m) throw new MobilityError('MOB_ERR_USAGE', `not a host: ${spec}`);
  return { host: m[1], port: m[2] ? Number(m[2]) : defPort };
}

export async function pushInstall(v: Values, conn: ApiConn, dataDir: string): Promise<number> {
  const hosts: string[] = [...((v.host as string[] | undefined) ?? [])];
  if (v['hosts-file']) hosts.push(...(await fsp.readFile(v['hosts-file'] as string, 'utf8')).split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#')));
  if (!hosts.length) throw new MobilityError('MOB_ERR_USAGE', '--host (or --hosts-file) is required');
  const defPort = v.port ? Number(v.port) : 22;
  let user = v.user as string | undefined;
  let keyFile: string | undefined;
  let password: string | undefined;
  let storedKey: string | null = null;
  if (v.account) {
    const { ConfigDb } = await import('../server/config-db.js');
    const db = ConfigDb.open(dataDir);
    try {
      const a = db.getPushAccount(v.account as string);
      user ??= a.user;
      if (a.kind === 'password') password = a.secret;
      else storedKey = a.secret; // handed to ssh2 in memory; never written to disk in clear
    } finally {
      db.close();
    }
  } else if (v.key) {
    keyFile = path.resolve(v.key as string);
  } else if (v['password-file']) {
    password = await readSecretFile(v['password-file'] as string, 'password-file');
  } else {
    throw new MobilityError('MOB_ERR_USAGE', 'give --key, --password-file or --account');
  }
  if (!user) throw new MobilityError('MOB_ERR_USAGE', '--user is required');
  const bundle = await findBundle(v.bundle as string | undefined);
  const parallel = Math.max(1, Number(v.parallel ?? 4) || 4);
  const timeoutMs = v.timeout ? parseDuration(v.timeout as string) : 120_000;
  if (conn.url.protocol !== 'wss:') throw new MobilityError('MOB_ERR_USAGE', 'push install needs a TLS server (wss://)');
  const serverUrl = `wss://${conn.url.host}`;

  const { SshPushInstaller } = await import('../install/ssh-push.js');
  const installer = new SshPushInstaller({
    registrationTimeoutMs: timeoutMs,
    waitForRegistration: async (tokenId, ms) => {
      const end = Date.now() + ms;
      while (Date.now() < end) {
        const j = await api(conn, 'GET', '/v1/machines').catch(() => ({ machines: [] }));
        const m = ((j as { machines?: { agentId: string; registeredWith: string; connected: boolean }[] }).machines ?? []).find((x) => x.registeredWith === `token ${tokenId}`);
        if (m?.connected) return m.agentId;
        await new Promise((r) => setTimeout(r, 500));
      }
      return null;
    },
  });

  const tty = process.stderr.isTTY && !v.json;
  const lines = new Map<string, string>();
  const render = () => {
    if (!tty) return;
    process.stderr.write(`\x1b[${lines.size}A`);
    for (const [h, l] of lines) process.stderr.write(`\x1b[2K${h.padEnd(28)} ${l}\n`);
  };
  if (tty) for (const h of hosts) { lines.set(h, 'queued'); process.stderr.write('\n'); }
  render();
  const report = (h: string, step: PushStep, detail?: string) => {
    if (tty) { lines.set(h, `${step}${detail ? ` (${detail})` : ''}`); render(); }
    else process.stderr.write(JSON.stringify({ at: new Date().toISOString(), host: h, step, detail }) + '\n');
  };

  const results: PushResult[] = [];
  let next = 0;
  const worker = async () => {
    while (next < hosts.length) {
      const spec = hosts[next++];
      const { host, port } = parseHost(spec, defPort);
      let r: PushResult;
      try {
        // a one-time token per host; the answer also names the certificate fingerprint the agent pins
        const t = await api(conn, 'POST', '/v1/tokens', { label: `push-install ${spec}`, ttlMs: timeoutMs + 30 * 60_000 });
        const fingerprint = String(t.fingerprint ?? '');
        const ph: PushHost = { host, port, user: user!, keyFile, password, hostKeySha256: v['host-key'] as string | undefined };
        if (storedKey !== null) ph.privateKey = Buffer.from(storedKey);
        r = await installer.install(ph, { bundle, serverUrl, token: String(t.token), serverFingerprint: fingerprint, prefix: v.prefix as string | undefined }, (s, d) => report(spec, s, d));
      } catch (err) {
        const e = err instanceof MobilityError ? err : new MobilityError('MOB_ERR_PUSH_INSTALL_FAILED', String(err));
        r = { host, ok: false, code: e.code, message: e.message, step: 'connect', ms: 0 };
      }
      results.push(r);
      if (tty) { lines.set(spec, r.ok ? `ok — ${r.message} (${(r.ms / 1000).toFixed(1)} s)` : `FAILED ${r.code} at ${r.step}`); render(); }
    }
  };
  await Promise.all(Array.from({ length: Math.min(parallel, hosts.length) }, worker));
  if (v.json) process.stdout.write(JSON.stringify({ results }, null, 2) + '\n');
  else {
    for (const r of results) {
      process.stdout.write(r.ok ? `${r.host}: ok, agent ${r.agentId ?? '?'} (${(r.ms / 1000).toFixed(1)} s)\n` : `${r.host}: ${r.code} at ${r.step}: ${r.message}\n`);
    }
    process.stdout.write(`${results.filter((r) => r.ok).length}/${results.length} hosts installed\n`);
  }
  return results.every((r) => r.ok) ? EXIT.OK : EXIT.ERROR;
}
