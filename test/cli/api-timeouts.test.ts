/**
 * The operator CLI does not wait for ever on a server that does not answer: a listener that
 * never completes the TLS handshake, and one that completes it but never answers the request,
 * are both MOB_ERR_UNREACHABLE (exit 5) with what happened, within the configured bounds.
 */
import t from 'tap';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { ensureTlsIdentity } from '../../src/transport/tls.js';
import { runCli, tmpDir } from '../helpers.js';

t.test('a silent server: handshake and answer bounds', async (t) => {
  const dir = await tmpDir(t);
  const id = await ensureTlsIdentity(path.join(dir, 'srv'), ['localhost']);
  const tokenFile = path.join(dir, 'token');
  await fsp.writeFile(tokenFile, 'x'.repeat(40), { mode: 0o600 });
  const sockets = new Set<net.Socket>();
  // takes TCP connections and never speaks
  const mute = net.createServer((s) => { sockets.add(s); s.on('error', () => undefined); });
  // completes TLS, reads the request, never answers
  const deaf = tls.createServer({ key: id.key, cert: id.cert }, (s) => { sockets.add(s); s.on('error', () => undefined); s.resume(); });
  await new Promise<void>((r) => mute.listen(0, '127.0.0.1', r));
  await new Promise<void>((r) => deaf.listen(0, '127.0.0.1', r));
  t.teardown(() => { for (const s of sockets) s.destroy(); mute.close(); deaf.close(); });
  const port = (s: net.Server) => (s.address() as net.AddressInfo).port;
  const env = { ...process.env, MOBILITY_CONNECT_TIMEOUT_MS: '500', MOBILITY_API_TIMEOUT_MS: '500' };

  const a = await runCli(['status', '--server', `wss://127.0.0.1:${port(mute)}`, '--token-file', tokenFile, '--pin', id.fingerprint256], env).done;
  t.equal(a.code, 5, `no handshake: exit 5 (${a.stderr.trim()})`);
  t.match(a.stderr, /MOB_ERR_UNREACHABLE.*did not complete a TLS handshake within \d+ s/);

  const b = await runCli(['status', '--server', `wss://127.0.0.1:${port(deaf)}`, '--token-file', tokenFile, '--pin', id.fingerprint256], env).done;
  t.equal(b.code, 5, `no answer: exit 5 (${b.stderr.trim()})`);
  t.match(b.stderr, /MOB_ERR_UNREACHABLE.*sent nothing for \d+ s during GET \/v1\/status/);
});
