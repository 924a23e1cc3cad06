/**
 * isCertificateError against the errors real TLS connections give (the agent daemon's control
 * connection maps them to MOB_ERR_TLS_PIN, everything else to MOB_ERR_UNREACHABLE): another
 * server's CA, a name the certificate does not hold, and a refused connection.
 */
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import t from 'tap';
import WebSocket from 'ws';
import { describeCertError, ensureTlsIdentity, isCertificateError } from '../../src/transport/tls.js';
import { tmpDir } from '../helpers.js';

/** The error a WebSocket connection (as the daemon opens it: ws with a CA) ends with. */
function wsError(url: string, ca: string): Promise<Error> {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { ca, handshakeTimeout: 10_000 });
    ws.on('error', (err) => resolve(err));
    ws.on('open', () => { ws.terminate(); resolve(new Error('connected')); });
  });
}

t.test('certificate refusals are told apart from network failures by their code', async (t) => {
  const mine = await ensureTlsIdentity(await tmpDir(t));
  const other = await ensureTlsIdentity(await tmpDir(t));
  const listen = async (host: string) => {
    const srv = https.createServer({ key: mine.key, cert: mine.cert });
    await new Promise<void>((r) => srv.listen(0, host, r));
    t.teardown(() => new Promise<void>((r) => { srv.closeAllConnections(); srv.close(() => r()); }));
    return (srv.address() as AddressInfo).port;
  };
  const port = await listen('127.0.0.1');
  const wrongCa = await wsError(`wss://127.0.0.1:${port}/`, other.ca);
  t.ok(isCertificateError(wrongCa), `another server's CA: ${(wrongCa as NodeJS.ErrnoException).code}`);
  t.match(describeCertError((wrongCa as NodeJS.ErrnoException).code!), /not signed by the given CA/);

  const port2 = await listen('127.0.0.2');
  const byName = await wsError(`wss://127.0.0.2:${port2}/`, mine.ca);
  t.ok(isCertificateError(byName), `a name the certificate does not hold: ${(byName as NodeJS.ErrnoException).code}`);
  t.match(describeCertError((byName as NodeJS.ErrnoException).code!), /does not name the host/);

  const refused = await wsError('wss://127.0.0.1:9/', mine.ca);
  t.notOk(isCertificateError(refused), `a refused connection is not: ${(refused as NodeJS.ErrnoException).code}`);
  t.notOk(isCertificateError(new Error('certificate mentioned in a message')), 'the message text does not count');
  t.notOk(isCertificateError(undefined));
});
