/**
 * The `mobility` command: help, the replication and operations commands, and the
 * dispatch to admin.ts (configuration server, agent lifecycle). Argument parsing and
 * exit codes (one switch, exitCodeFor) live in args.ts, the API client in
 * api-client.ts; no other module of the CLI imports this one.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { AGENT_VERSION, DEFAULT_BLOCK_SIZE, DEFAULT_PORT, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, PAGE_SIZE, PROTOCOL_VERSION } from '../constants.js';
import { MobilityError, isErrorCode, toMobilityError } from '../errors.js';
import { createLogger, type Logger } from '../log.js';
import { tuneHeapForStreaming } from '../util/heap-tuning.js';
import { defaultAgentId, replicate, type DiskResult, type ReplicateMode } from '../agent/replicator.js';
import { EXIT, compressMode, exitCodeFor, parse, parseDuration, parseSize, type Values } from './args.js';
import { CONN_HELP, CONN_OPTIONS, api, apiStream, connOptions, fmtAge, serverConn, type ApiConn } from './api-client.js';
import { ProgressReporter, fmtBytes, table } from './progress.js';

// moved to args.ts and api-client.ts; re-exported for code that imported them from here (bench/run.ts)
export { EXIT, exitCodeFor, parse, parseDuration, parseSize, readSecretFile, type Values } from './args.js';
export { api, apiStream, connOptions, fmtAge, serverConn, type ApiConn } from './api-client.js';

const HELP: Record<string, string> = {
  main: `mobility — block-level disaster-recovery replication

Usage: mobility <command> [options]

Commands:
  server      run the process server and replica store
  replicate   replicate disks to a server (initial, incremental or checksum resync)
  verify      compare disks with their replicas without changing anything
  protect     protect block devices continuously (tracefs tracking, consistency cuts, recovery points)
  status      per-disk state, RPO, data lag, backlog and churn, as the server sees them (--history: over time)
  events      what happened: state changes, recovery points, cut failures, sessions lost, alerts
  alerts      RPO alerts (active ones; --all for the cleared ones too)
  points      list an agent's recovery points (or a consistency group's points)
  test-failover  materialise a writable image of a recovery point, or of every machine of a group point (or --cleanup it)
  failover    stop replication of an agent and promote a recovery point (after a final cut)
  reprotect   fail back: pull only the differences from the promoted images into the original disks (asks first)
  demo        the whole product on this machine: server, agent, protection, points, a checked test failover

Configuration server and agents:
  passphrase  show or rotate the registration passphrase (on the server)
  token       mint a one-time registration token
  register    register this machine's agent with a server (passphrase or token)
  agent       run the Mobility service (under systemd; install.sh sets it up)
  preflight   check this machine can run the agent (root, OS, space, tracefs, clock, server port, disks)
  machines    registered machines with their inventory, connection, policy and disks
  policy      create, list and assign replication policies
  enable      start protecting a disk of a registered machine (pushed to its agent)
  disable     stop protecting a disk and delete its replica (asks first; --yes when not on a terminal)
  cut         take a consistency cut of a machine now and print its recovery point
  group       consistency groups: machines cut together (create, list, delete, cut)
  capacity    plan bandwidth, storage and process servers from churn measured on profiled disks
  recovery-plan  machines of an application recovered together: steps in boot order, scripts, network mapping, boot checks
  push-install  install the agent on Linux hosts over SSH (parallel, with progress)
  push-account  store, list or remove push-install accounts (encrypted at rest)
  operator    add, list or remove operators of the web console (https://SERVER:PORT/console/)

Operator profiles (connection options saved once):
  login       check a connection to a server and save it as a profile (server, CA or pin, token)
  logout      remove a profile
  profiles    list the saved profiles (never their tokens)

Run 'mobility <command> --help' (or 'mobility help <command>') for the options of a command;
'mobility --version' prints the version.
Exit codes: 0 ok, 1 error, 2 usage, 3 configuration/source, 4 auth/TLS pin, 5 unreachable, 6 verify found differences, 130 interrupted.
`,
  server: `Usage: mobility server [--data-dir DIR] [--listen HOST:PORT] [--san NAME]... [--no-tls] [--store SPEC [--store-credentials FILE] [--store-retry DURATION]]

Runs the process server. On first start it creates in DATA-DIR:
  tls/ca.pem, tls/server.pem (+ keys, mode 0600)   the TLS identity agents pin
  token (mode 0600)                                 the pre-shared agent token
  metrics-token (mode 0600)                         read-only token of GET /metrics (Prometheus)
  replicas/<agent>/                                 points.json (recovery points), failover.json (while failed over),
                                                    test-failovers.json (network mappings and boot checks of test failovers)
  boot-checks/<agent>/<point>-<time>.log            the whole console of each boot check
  mnt/                                              recovered images mounted while a network mapping is written
With the file store (the default), also:
  replicas/<agent>/<disk>/                          replica.img, state.json, wal.log, undo/<point>.undo
                                                    (in DIR/<agent>/<disk>/ with --store file:DIR)
  test-failover/<agent>/<point>/<disk>.img          test-failover images
  failover/<agent>/<disk>.img                       promoted images (failover)
With an azure store, the container holds each replica as a page blob replicas/<agent>/<disk>,
its recovery points as blob snapshots, and the test-failover and failover images as page
blobs; the data directory keeps points.json and failover.json per agent.

Options:
  --data-dir DIR      state directory (default ./mobility-data)
  --listen HOST:PORT  address to listen on (default 127.0.0.1:${DEFAULT_PORT}; port 0 picks one)
  --san NAME          extra DNS name or IP for the server certificate (repeatable; first start only)
  --no-tls            plain ws:// (testing only)
  --store SPEC        where replicas and recovery points live:
                        file:DIR                     files under DIR (default file:DATA-DIR/replicas)
                        azure:ACCOUNT-URL/CONTAINER  Azure page blobs, e.g.
                                                     azure:https://acct.blob.core.windows.net/mobility
                      the URL carries no credentials (no SAS token): they go in --store-credentials
  --store-credentials FILE
                      credentials of an azure store: a JSON file of mode 0600 (a file readable by
                      group or others is refused) holding one of
                        {"accountName": "...", "accountKey": "..."}
                        {"sasToken": "sv=...&sig=..."}
                        {"connectionString": "..."}
                      the secret in it is never logged nor printed; required with azure:
  --store-retry DURATION
                      how long transient failures of the store (HTTP 429/500/503, resets,
                      timeouts) are retried, with capped exponential backoff, before the disk
                      goes to target-unavailable (default 2m); the agent keeps its changes and
                      resumes when the store answers again
  --json-logs         JSON logs even on a terminal
`,
  replicate: `Usage: mobility replicate --server URL --token-file F (--ca F | --pin SHA256) --disk PATH[=ID]... [options]

Replicates each disk to the server. The pass is chosen per disk (--mode auto):
  initial      no replica yet: one full pass (zero blocks as flags, lz4 per block)
  incremental  the digest map matches the replica: only changed pages are shipped
  resync       digest map missing or untrusted: compare digests with the replica, ship only differences
An interrupted initial replication resumes where the acknowledged data ends.

Options:
  --server URL          wss://HOST:PORT (or ws:// for a --no-tls server)
  --token-file F        file holding the server's agent token (DATA-DIR/token)
  --ca F                CA certificate to trust (DATA-DIR/tls/ca.pem)
  --pin SHA256          server certificate fingerprint (instead of --ca)
  --disk PATH[=ID]      file or block device; ID defaults to the file name (repeatable)
  --agent-id ID         defaults to the host name
  --state-dir DIR       agent state (digest maps), default ./mobility-agent
  --mode M              auto | initial | incremental | resync (default auto)
  --block-size N        transfer block size, e.g. 64K (default ${DEFAULT_BLOCK_SIZE / 1024}K)
  --compress MODE       auto (default: lz4 only while the network is the bottleneck or
                        --max-rate is set), always, never
  --no-compress         same as --compress never
  --max-rate N          bandwidth limit in bytes/s, e.g. 50M
  --retry-deadline S    give up reconnecting after S seconds (default 120)
  --json                print the result as JSON on stdout
`,
  verify: `Usage: mobility verify --server URL --token-file F (--ca F | --pin SHA256) --disk PATH[=ID]... [options]

Compares each disk with its replica page by page (xxh64 of 4 KiB pages) and reports
mismatching byte ranges. Changes nothing. Exit code 6 when any disk differs.

Options: --server, --token-file, --ca, --pin, --disk, --agent-id, --state-dir, --retry-deadline, --json (as for replicate)
`,
  protect: `Usage: mobility protect --server URL --token-file F (--ca F | --pin SHA256) --disk DEV[=ID]... [options]
       mobility protect --qmp SOCKET --disk NODE[=ID]... [connection options] [options]   (host mode)

Protects block devices continuously until stopped (SIGTERM/SIGINT):
  - a private tracefs instance records every completed write, discard and write-zeroes;
    it keeps recording while the agent is down, so a restart costs no scan
  - changed blocks are read (O_DIRECT) and shipped within a fraction of a second;
    a block stays dirty until the server has made it durable
  - consistency cuts: converge, freeze the filesystems mounted from the disks, ship the
    remainder, thaw, record a recovery point (crash-consistent every --crash-interval,
    app-consistent with hooks every --app-interval); SIGUSR1 asks for an app-consistent
    cut now, SIGUSR2 for a crash-consistent one
  - lost tracking (buffer overrun, reboot) -> resync-required -> resyncing (a scan
    against the digest map, never a full copy) -> continuous
Events are printed on stdout as JSON lines.

Options (besides --server, --token-file, --ca, --pin, --disk, --agent-id, --state-dir, --block-size, --compress, --no-compress, --max-rate):
  --crash-interval D    crash-consistent cut interval, e.g. 5m, 30s (default 5m, at least 15s)
  --app-interval D      app-consistent cut interval (default 60m; 0 = none scheduled)
  --hooks-dir DIR       hook scripts: DIR/pre-freeze/*, DIR/frozen/*, DIR/post-thaw/*
  --hook-timeout D      per hook (default 60s)
  --freeze-limit D      longest time the filesystems may stay frozen (default 10s); past it they are thawed and the cut is retried later
  --spool-budget SIZE   most a cut reads while frozen (default 256M): the remainder is read locally into a
                        spool, the disks thawed, and only then shipped; a larger remainder is not read,
                        the disks are thawed at once and the cut converges further first
  --spool-memory SIZE   the part of the spool kept in memory (default 32M); the rest goes to STATE-DIR/<agent>/cut.spool
  --trace-buffer-kb N   per-CPU trace buffer (default 8192)

Host mode (--qmp SOCKET: a running QEMU's QMP socket; --disk names the VM's disks by their
format node names, as query-named-block-nodes lists them): QEMU dirty bitmaps track the writes
(persistent in qcow2 images: a restart of QEMU or of the agent costs no scan; on raw images a
QEMU restart is an explained checksum resync), data is read through QEMU's FUSE export, and
a cut is a copy-before-write view of every disk started in one QMP transaction: the guest does
not pause. The state directory holds the exports and views (it needs /dev/fuse).
  --nbd-socket SOCKET   QEMU's own NBD server, if it runs one (else the agent starts one)
  --guest-agent SOCKET  the VM's QEMU guest agent socket (e.g. Proxmox's /var/run/qemu-server/VMID.qga):
                        app-consistent cuts freeze the guest's filesystems through it (pre-freeze,
                        frozen and post-thaw hooks run on this host as in-guest; --freeze-limit bounds
                        the freeze) and a guest left frozen by a killed agent is thawed at start.
                        Without it, app-consistent cuts are recorded as crash-consistent, with a note
  --guest-mount PATH    freeze only this mount point of the guest (repeatable; default: the whole guest)
`,
  status: `Usage: mobility status [--data-dir DIR | --token-file F (--ca F | --pin SHA256) | --profile NAME] [--server URL] [--json]
       mobility status --history [--range 1h|24h|7d] [--agent A] [--disk D] [connection options] [--json]

Per disk: state (initial-sync, continuous, resync-required, resyncing, disconnected,
target-unavailable, failed-over) and reason, RPO (age of the newest recovery point, marked !
past RPO ALERT: the threshold of the machine's policy, or the server's default of 15 min for
an unregistered agent), data lag (age of the oldest unshipped write), backlog,
churn, recovery points, STORED (what the replica and its points occupy in the server's
replica store), freeze statistics. target-unavailable: the replica store (e.g. Azure
storage) does not answer; the agent keeps its changes and resumes when it is back.
The active RPO alerts follow the table (see mobility alerts).

--history: the server's samples of each disk over the last --range (default 1h): one row per
5 minutes (1h), hour (24h) or 6 hours (7d) with the highest RPO, data lag and backlog, the mean
churn and the last state; --json prints every sample (10 s, or 1 minute past a day).
${CONN_HELP}`,
  events: `Usage: mobility events [--since T] [--limit N] [--agent A] [--disk D] [connection options] [--json]

What the server recorded, newest first: a disk's state changes (with the reason), recovery
points recorded or refused, cut failures, sessions lost, RPO alerts fired and cleared. Kept for
7 days. --since: an ISO 8601 time or an age such as 30m, 2h, 1d; --limit: at most N (default 100).
${CONN_HELP}`,
  alerts: `Usage: mobility alerts [--all] [connection options] [--json]

RPO alerts, newest first: one fires when the age of a disk's newest recovery point passes its
machine's policy threshold (RPO ALERT of mobility status) and clears when it is back under, each
with its times, RPO, threshold and reason. Without --all only the active ones.
${CONN_HELP}`,
  points: `Usage: mobility points [--data-dir DIR | --token-file F (--ca F | --pin SHA256) | --profile NAME] [--server URL] [--agent-id ID | --group G] [--json]

Lists the agent's recovery points, oldest first, as a table: POINT (its id), TAKEN AT (the
agent's clock at the freeze), KIND (crash or app), FROZEN (how long the filesystems were
frozen), DISKS, VERIFIED (pages of the sampled verification), GROUP POINT (the group point the
point is this machine's part of, '-' for the machine's own points), NOTE (SUSPECT and the
point's note). --agent-id defaults to this machine's host name.
With --group G: the group's points, oldest first: GROUP POINT, TAKEN AT (the earliest freeze),
KIND (app when app-consistent on every machine), COMPLETE (every machine recorded its part;
only complete group points can be test-failed-over), and each machine's recovery point.
${CONN_HELP}`,
  'test-failover': `Usage: mobility test-failover [--data-dir DIR | --token-file F (--ca F | --pin SHA256) | --profile NAME] [--server URL] [--agent-id ID | --group G] [--point ID|latest|latest-app] [--download DIR | --cleanup]
                               [--network-map FILE] [--boot-check [--boot-marker RE] [--boot-timeout 5m] [--boot-bus virtio|nvme|ide]
                               [--boot-accel auto|kvm|tcg] [--boot-network none|isolated] [--boot-disk ID]] [--json]

Has the server's replica store make a writable image of every disk of the point while
replication goes on:
  file store   DATA-DIR/test-failover/<agent>/<point>/<disk>.img: a reflink copy where the
               filesystem supports it, else a sparse copy, rolled back to the point by the
               undo journals
  azure store  a page blob in the container, copied from the point's snapshot
Prints each disk's image location (a path on the server, or a blob URL) and how it was made.

Options:
  --point P       ID, latest (default) or latest-app
  --download DIR  also write each image as a sparse file DIR/<disk>.img. The SERVER writes
                  these files: DIR is a directory on the server machine, not on this one
                  (a relative DIR is made absolute against this command's current directory,
                  so give an absolute path when the server runs elsewhere). Progress
                  (percentage, throughput, ETA) is shown on stderr.
  --cleanup       remove the test-failover images of the point (not the downloaded files)
  --group G       every machine of consistency group G at one group point: --point is a
                  group point id (mobility points --group G), latest (the newest complete
                  group point) or latest-app; --download writes DIR/<agent>/<disk>.img
                  (network mappings and boot checks of a group: mobility recovery-plan)
  --network-map FILE  a network mapping (JSON, read here and sent to the server; see
                  docs/operations.md): written into the image for the guest's network stack
                  (netplan, systemd-networkd or ifupdown, detected in the image) before boot
  --boot-check    boot the images under QEMU on the server (KVM when it can, else TCG), with
                  no network, and watch the serial console for the marker; the guest's writes
                  are discarded. The result (booted in N s, or the last console lines) is
                  kept with the test failover and shown by mobility status. Exit 1 when the
                  guest does not reach the marker.
  --boot-marker RE    regular expression a console line must match (default: a login prompt
                  or systemd's "Reached target ... Multi-User System")
  --boot-timeout D    time limit from QEMU's start to the marker (default 5m)
  --boot-bus B    how the disks are attached: virtio (default), nvme or ide
  --boot-accel A  auto (default: KVM when /dev/kvm works, else TCG), kvm or tcg
  --boot-network N    none (default) or isolated (a user-mode network with no way out, one
                  NIC per mapped MAC)
  --boot-disk ID  the disk to boot from (default: the one the mapping went to, else the first)
  --json          the server's answer as JSON
${CONN_HELP}`,
  failover: `Usage: mobility failover [--data-dir DIR | --token-file F (--ca F | --pin SHA256) | --profile NAME] [--server URL] --agent-id ID [--point ID|latest|latest-app] [--no-final-cut] [--yes] [--json]

Fails an agent over on the server:
  1. with --point latest (the default) and the agent connected, asks it for a final
     crash-consistent cut and waits for it (up to 2 minutes), unless --no-final-cut;
  2. has the replica store make an image of the point of every disk: the promoted disks,
     to attach to the recovery machine (file store: DATA-DIR/failover/<agent>/<disk>.img;
     azure store: a page blob failover/<agent>/<disk>); prints where each one is;
  3. stops replication: the agent's session ends with MOB_ERR_FAILED_OVER and new sessions
     are refused until 'mobility reprotect' fails back.
Asks first on a terminal; elsewhere it needs --yes.
${CONN_HELP}`,
  reprotect: `Usage: mobility reprotect [--data-dir DIR | --token-file F (--ca F | --pin SHA256) | --profile NAME] [--server URL] --agent-id ID --disk DEV[=ID]... [--yes] [--json]
       mobility reprotect ... --vm-images --disk IMAGE[=ID]...   (host mode: the VM's qcow2/raw images)

Run on the original machine once the recovered machine is shut down. For each disk (it must
not be mounted): compares it page by page with its promoted image on the server and writes
only the differing pages (a checksum resync in the reverse direction), checks the disk now
equals the image, then fails back on the server: the promoted images become the replicas
(a new generation; the points of the old timeline are dropped) and 'mobility protect' can
run again (its first pass is a checksum resync that finds nothing to send).
Whatever was written to these disks after the failover is overwritten: on a terminal the
command lists the disks and asks; elsewhere it refuses (MOB_ERR_USAGE, exit 2) without --yes.
Host mode (--vm-images): --disk names the VM's disk images (qcow2 or raw); shut the VM down
first (an image in use is refused): a storage daemon of the agent's own opens them for writing.
A registered machine, or a VM protected by a host agent, replicates only with its agent's
certificate: --agent-state DIR (the agent's state directory) uses it for the data session.
${CONN_HELP}`,
  demo: `Usage: mobility demo [--dir DIR] [--keep] [--files [--size N]]

As root (with tracefs, losetup, mkfs.ext4, e2fsck, fsfreeze): the whole product on this
machine. Starts 'mobility server' on 127.0.0.1 with TLS, makes a 128 MiB loop device with
ext4 and files, registers an agent with the server's passphrase and runs it ('mobility
agent'), creates a policy, enables the disk (preflight on the agent), shows the initial
replication, takes three recovery points after changing files, and test-fails-over the
middle one: e2fsck -fn of the image, and every file's checksum equal to the disk's at that
point. Then status, the points and the console URL. On a terminal it waits for Enter before
tearing everything down (loop device, mount, trace instance, processes).

Otherwise (or with --files): a disk image replicated to the server (initial), 1% of it
rewritten, replicated again (incremental), verified, with sha256(source) == sha256(replica)
after each step.

Options:
  --dir DIR    work directory (default: a new temporary directory)
  --keep       keep the work directory
  --files      the file-based demo even as root
  --size N     image size of the file-based demo, e.g. 256M (default 256M)
`,
};

/** Peak RSS and CPU seconds of this process, for benchmarks and operators. */
export function resources(): { maxRssBytes: number; userCpuSec: number; systemCpuSec: number } {
  const r = process.resourceUsage();
  return { maxRssBytes: r.maxRSS * 1024, userCpuSec: r.userCPUTime / 1e6, systemCpuSec: r.systemCPUTime / 1e6 };
}

async function cmdServer(argv: string[]): Promise<number> {
  const { values: v } = parse(argv, {
    'data-dir': { type: 'string' }, listen: { type: 'string' }, san: { type: 'string', multiple: true },
    'no-tls': { type: 'boolean' }, 'json-logs': { type: 'boolean' }, store: { type: 'string' }, 'store-credentials': { type: 'string' }, 'store-retry': { type: 'string' },
  });
  if (v.help) { process.stdout.write(HELP.server); return EXIT.OK; }
  const store = v.store as string | undefined;
  const credentials = v['store-credentials'] as string | undefined;
  // the spec itself is checked by the server (target/backends.ts); a credentials file nothing would read is a mistake
  if (credentials !== undefined && !store?.startsWith('azure:')) throw new MobilityError('MOB_ERR_USAGE', '--store-credentials is for an azure: store (--store azure:ACCOUNT-URL/CONTAINER)');
  const listen = (v.listen as string | undefined) ?? `127.0.0.1:${DEFAULT_PORT}`;
  const m = /^(.*):(\d+)$/.exec(listen);
  if (!m) throw new MobilityError('MOB_ERR_USAGE', `--listen wants HOST:PORT, got ${listen}`);
  const logger = createLogger({ component: 'server', json: v['json-logs'] ? true : undefined });
  // loaded here so the agent commands do not pay for the server's modules at start-up
  const { ProcessServer } = await import('../server/process-server.js');
  const dataDir = path.resolve((v['data-dir'] as string | undefined) ?? 'mobility-data');
  const server = new ProcessServer({
    dataDir, host: m[1].replace(/^\[|\]$/g, ''), port: Number(m[2]), tls: !v['no-tls'], extraNames: v.san as string[] | undefined, logger,
    store, storeCredentials: credentials === undefined ? undefined : path.resolve(credentials),
    storeRetryMs: v['store-retry'] === undefined ? undefined : parseDuration(v['store-retry'] as string),
  });
  const addr = await server.start();
  const scheme = v['no-tls'] ? 'ws' : 'wss';
  // one machine-readable line on stdout for scripts and tests
  process.stdout.write(JSON.stringify({
    event: 'listening', url: `${scheme}://${addr.family === 'IPv6' ? `[${addr.address}]` : addr.address}:${addr.port}`,
    port: addr.port, dataDir, tokenFile: path.join(dataDir, 'token'), caFile: server.identity?.caFile ?? null, fingerprint: server.identity?.fingerprint256 ?? null,
    store: `${server.backend.kind}:${server.backend.location}`,
  }) + '\n');
  await new Promise<void>((resolve) => {
    const stop = (sig: string) => {
      logger.info('stopping', { signal: sig });
      server.stop().then(() => {
        logger.info('stopped', { resources: resources(), stats: server.stats });
        resolve();
      }, resolve);
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
  return EXIT.OK;
}

function parseDisks(list: string[] | undefined): { path: string; id: string }[] {
  if (!list?.length) throw new MobilityError('MOB_ERR_USAGE', '--disk is required');
  return list.map((d) => {
    const i = d.lastIndexOf('=');
    const p = i > 0 ? d.slice(0, i) : d;
    const id = i > 0 ? d.slice(i + 1) : path.basename(p).replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 64);
    return { path: p, id };
  });
}

const CONN_OPTS = {
  server: { type: 'string' }, 'token-file': { type: 'string' }, ca: { type: 'string' }, pin: { type: 'string' },
  disk: { type: 'string', multiple: true }, 'agent-id': { type: 'string' }, 'state-dir': { type: 'string' },
  'retry-deadline': { type: 'string' }, json: { type: 'boolean' }, 'json-logs': { type: 'boolean' },
} as const;

function parseBlockSize(v: Values): number {
  const blockSize = v['block-size'] ? parseSize(v['block-size'] as string) : DEFAULT_BLOCK_SIZE;
  if (blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE || blockSize % PAGE_SIZE !== 0) {
    throw new MobilityError('MOB_ERR_USAGE', `--block-size must be a multiple of ${PAGE_SIZE / 1024}K between ${MIN_BLOCK_SIZE / 1024}K and ${MAX_BLOCK_SIZE / 1024}K`);
  }
  return blockSize;
}

async function cmdProtect(argv: string[]): Promise<number> {
  const { values: v } = parse(argv, {
    ...CONN_OPTS, 'block-size': { type: 'string' }, 'no-compress': { type: 'boolean' }, compress: { type: 'string' }, 'max-rate': { type: 'string' },
    'crash-interval': { type: 'string' }, 'app-interval': { type: 'string' }, 'hooks-dir': { type: 'string' }, 'hook-timeout': { type: 'string' },
    'freeze-limit': { type: 'string' }, 'trace-buffer-kb': { type: 'string' }, 'spool-budget': { type: 'string' }, 'spool-memory': { type: 'string' },
    qmp: { type: 'string' }, 'nbd-socket': { type: 'string' }, 'guest-agent': { type: 'string' }, 'guest-mount': { type: 'string', multiple: true },
  });
  if (v.help) { process.stdout.write(HELP.protect); return EXIT.OK; }
  if (v.qmp === undefined && v['nbd-socket'] !== undefined) throw new MobilityError('MOB_ERR_USAGE', '--nbd-socket goes with --qmp (host mode)');
  if (v.qmp === undefined && v['guest-agent'] !== undefined) throw new MobilityError('MOB_ERR_USAGE', '--guest-agent goes with --qmp (host mode); in-guest cuts freeze with fsfreeze');
  if (v['guest-agent'] === undefined && v['guest-mount'] !== undefined) throw new MobilityError('MOB_ERR_USAGE', '--guest-mount goes with --guest-agent');
  const guestMounts = v['guest-mount'] as string[] | undefined;
  if (guestMounts?.some((m) => !m.startsWith('/'))) throw new MobilityError('MOB_ERR_USAGE', '--guest-mount wants an absolute mount point of the guest');
  const guestAgent = v['guest-agent'] === undefined ? undefined : path.resolve(v['guest-agent'] as string);
  if (v.qmp !== undefined && v['trace-buffer-kb'] !== undefined) throw new MobilityError('MOB_ERR_USAGE', '--trace-buffer-kb is for in-guest tracking; host mode (--qmp) uses QEMU dirty bitmaps');
  const size = (k: string) => {
    if (v[k] === undefined) return undefined;
    const n = parseSize(v[k] as string);
    if (n <= 0) throw new MobilityError('MOB_ERR_USAGE', `--${k} wants a positive size`);
    return n;
  };
  const c = await connOptions(v);
  const logger = createLogger({ component: 'agent', json: v['json-logs'] ? true : undefined });
  const { Protector } = await import('../agent/protector.js');
  const dur = (k: string) => (v[k] === undefined ? undefined : parseDuration(v[k] as string));
  const bufKb = v['trace-buffer-kb'] === undefined ? undefined : Number(v['trace-buffer-kb']);
  if (bufKb !== undefined && !(Number.isInteger(bufKb) && bufKb > 0)) throw new MobilityError('MOB_ERR_USAGE', '--trace-buffer-kb wants a positive integer');
  const p = new Protector({
    serverUrl: c.url.toString(), token: c.token, ca: c.ca, pin: c.pin, agentId: (v['agent-id'] as string | undefined) ?? defaultAgentId(),
    disks: parseDisks(v.disk as string[] | undefined), stateDir: path.resolve((v['state-dir'] as string | undefined) ?? 'mobility-agent'),
    blockSize: parseBlockSize(v), compress: compressMode(v), maxRateBytes: v['max-rate'] ? parseSize(v['max-rate'] as string) : undefined,
    crashIntervalMs: dur('crash-interval'), appIntervalMs: dur('app-interval'), hooksDir: v['hooks-dir'] ? path.resolve(v['hooks-dir'] as string) : undefined,
    hookTimeoutMs: dur('hook-timeout'), freezeLimitMs: dur('freeze-limit'), trackerBufferKb: bufKb, logger,
    spoolBudgetBytes: size('spool-budget'), spoolMemoryBytes: size('spool-memory'),
    ...(v.qmp !== undefined ? { qemu: { qmpSocket: path.resolve(v.qmp as string), ...(v['nbd-socket'] ? { nbdSocket: path.resolve(v['nbd-socket'] as string) } : {}), ...(guestAgent ? { guestAgentSocket: guestAgent } : {}) } } : {}),
    ...(guestAgent ? { quiescer: new (await import('../agent/guest-agent-quiescer.js')).GuestAgentQuiescer({ socket: guestAgent, mountpoints: guestMounts }) } : {}),
    onEvent: (e) => process.stdout.write(JSON.stringify({ ...e, at: new Date().toISOString() }) + '\n'),
  });
  const stop = () => p.stop();
  process.removeAllListeners('SIGINT');
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  process.on('SIGUSR1', () => p.requestCut('app'));
  process.on('SIGUSR2', () => p.requestCut('crash'));
  await p.run();
  return EXIT.OK;
}

async function cmdOps(cmd: 'status' | 'points' | 'test-failover' | 'failover' | 'reprotect' | 'events' | 'alerts', argv: string[]): Promise<number> {
  const { values: v } = parse(argv, {
    ...CONN_OPTIONS, 'agent-id': { type: 'string' },
    ...(cmd === 'status' ? { history: { type: 'boolean' }, range: { type: 'string' } } : {}),
    ...(cmd === 'status' || cmd === 'events' ? { agent: { type: 'string' } } : {}),
    ...(cmd === 'events' ? { since: { type: 'string' }, limit: { type: 'string' } } : {}),
    ...(cmd === 'alerts' ? { all: { type: 'boolean' } } : {}),
    json: { type: 'boolean' }, point: { type: 'string' }, cleanup: { type: 'boolean' }, 'no-final-cut': { type: 'boolean' },
    disk: { type: 'string', multiple: true }, 'json-logs': { type: 'boolean' }, ...(cmd === 'reprotect' ? { yes: { type: 'boolean', short: 'y' }, 'vm-images': { type: 'boolean' }, 'agent-state': { type: 'string' } } : {}),
    ...(cmd === 'failover' ? { yes: { type: 'boolean', short: 'y' } } : {}),
    ...(cmd === 'test-failover' ? {
      download: { type: 'string' }, 'network-map': { type: 'string' }, 'boot-check': { type: 'boolean' }, 'boot-marker': { type: 'string' },
      'boot-timeout': { type: 'string' }, 'boot-bus': { type: 'string' }, 'boot-accel': { type: 'string' }, 'boot-network': { type: 'string' }, 'boot-disk': { type: 'string' },
    } : {}),
    ...(cmd === 'test-failover' || cmd === 'points' ? { group: { type: 'string' } } : {}),
  });
  if (v.group !== undefined && v['agent-id'] !== undefined) throw new MobilityError('MOB_ERR_USAGE', 'give --agent-id or --group, not both');
  if (v.group === '') throw new MobilityError('MOB_ERR_USAGE', '--group needs a group name');
  if (v.help) { process.stdout.write(HELP[cmd]); return EXIT.OK; }
  if (v.download !== undefined && v.cleanup) throw new MobilityError('MOB_ERR_USAGE', 'give --download or --cleanup, not both');
  if (v.download === '') throw new MobilityError('MOB_ERR_USAGE', '--download needs a directory (on the server machine)');
  const c = await serverConn(v);
  const agent = (v['agent-id'] as string | undefined) ?? defaultAgentId();
  const out = (j: unknown, text: () => string) => process.stdout.write(v.json ? JSON.stringify(j, null, 2) + '\n' : text());
  if (cmd === 'events' || cmd === 'alerts' || (cmd === 'status' && v.history)) {
    const h = await import('./history-cli.js');
    if (cmd === 'events') await h.cmdEvents(c, v);
    else if (cmd === 'alerts') await h.cmdAlerts(c, v);
    else await h.statusHistory(c, v);
    return EXIT.OK;
  }
  if (cmd === 'status' && (v.range !== undefined || v.agent !== undefined)) throw new MobilityError('MOB_ERR_USAGE', '--range and --agent go with --history');
  if (cmd === 'status') {
    const j = await api(c, 'GET', '/v1/status');
    const { alertLines } = await import('./history-cli.js');
    // active RPO alerts come with the status (an older server sends none)
    const alerts = Array.isArray(j.alerts) ? j.alerts as import('./history-cli.js').AlertView[] : [];
    const disks = (j.disks ?? []) as import('../server/http/api.js').DiskStatus[];
    // an older server sends none
    const tfs = Array.isArray(j.testFailovers) ? j.testFailovers as TestFailoverRecord[] : [];
    const target = j.target as { kind: string; location: string; listedAt: string | null; error: { code: string; message: string } | null; listing?: boolean } | undefined;
    const asListed = target?.listedAt ? `disks as listed at ${target.listedAt}` : 'no listing yet';
    const targetLine = target?.error
      ? `replica store ${target.kind}:${target.location} is not answering (${target.error.code}); ${asListed}\n`
      : target?.listing ? `replica store ${target.kind}:${target.location} is slow to list; ${asListed}\n` : '';
    out(j, () => {
      if (!disks.length) return `${targetLine}no protected disks\n${alertLines(alerts)}`;
      const rows = [['AGENT', 'DISK', 'STATE', 'RPO', 'RPO ALERT', 'LAG', 'BACKLOG', 'CHURN/s', 'POINTS', 'STORED', 'LAST FREEZE', 'REASON']];
      for (const d of disks) {
        const scanning = (d.state === 'initial-sync' || d.state === 'resyncing') && d.progressPermille !== null && d.progressPermille !== undefined;
        rows.push([d.agent, d.disk, scanning ? `${d.state} ${(d.progressPermille! / 10).toFixed(1)}%` : d.state, `${fmtAge(d.rpoMs)}${d.rpoAlert ? ' !' : ''}`,
          // the disk's own threshold (its machine's policy); an older server does not say it: '-', not its top-level default
          typeof d.rpoAlertMs === 'number' ? fmtAge(d.rpoAlertMs) : '-', fmtAge(d.dataLagMs), d.backlogBytes === null ? '-' : fmtBytes(d.backlogBytes),
          d.churnBytesPerSec === null ? '-' : fmtBytes(d.churnBytesPerSec), String(d.points), typeof d.storedBytes === 'number' ? fmtBytes(d.storedBytes) : '-', d.lastFreezeMs === null ? '-' : `${d.lastFreezeMs} ms${d.freezeFailures ? ` (${d.freezeFailures} failed)` : ''}`, d.reason]);
      }
      return targetLine + table(rows) + (disks.some((d) => d.rpoAlert) ? '! RPO above its alert threshold (RPO ALERT: the machine\'s policy) or no recovery point yet\n' : '')
        + alertLines(alerts) + testFailoverLines(tfs);
    });
    return EXIT.OK;
  }
  if (cmd === 'points' && v.group !== undefined) {
    const g = v.group as string;
    const j = await api(c, 'GET', `/v1/group-points?group=${encodeURIComponent(g)}`);
    type GP = { id: string; takenAt: string; kind: string; complete: boolean; members: string[]; points: Record<string, { id: string }> };
    const gps = (j.points ?? []) as GP[];
    out(j, () => gps.length ? table([['GROUP POINT', 'TAKEN AT', 'KIND', 'COMPLETE', 'MACHINES'], ...gps.map((p) => [
      p.id, p.takenAt, p.kind, p.complete ? 'yes' : 'NO', p.members.map((m) => `${m}:${p.points[m]?.id ?? '-'}`).join(' '),
    ])]) : `no group points for group ${g}\n`);
    return EXIT.OK;
  }
  if (cmd === 'points') {
    const j = await api(c, 'GET', `/v1/points?agent=${encodeURIComponent(agent)}`);
    const pts = (j.points ?? []) as import('../target/catalog.js').RecoveryPoint[];
    out(j, () => pts.length ? table([['POINT', 'TAKEN AT', 'KIND', 'FROZEN', 'DISKS', 'VERIFIED', 'GROUP POINT', 'NOTE'], ...pts.map((p) => [
      p.id, p.takenAt, p.kind, `${p.frozenMs} ms`, Object.keys(p.disks).join(','),
      // points recorded before sampled verification existed carry none
      p.verification ? `${Object.values(p.verification).reduce((n, x) => n + x.pages, 0)} pages` : '-',
      p.group ? `${p.group.id} (${p.group.name})` : '-',
      [p.suspect ? `SUSPECT (${p.suspect.disks.join(',')})` : '', p.note].filter(Boolean).join('; '),
    ])]) : `no recovery points for agent ${agent}\n`);
    return EXIT.OK;
  }
  if (cmd === 'failover') {
    if (!v['agent-id']) throw new MobilityError('MOB_ERR_USAGE', '--agent-id is required (failover acts on one agent)');
    if (!v.yes) {
      const { confirmDestructive } = await import('./confirm.js');
      await confirmDestructive({
        yes: false, command: 'failover', consequence: 'stops replication as said above',
        summary: `failover stops the replication of ${agent} for good and promotes its replica at ${(v.point as string | undefined) ?? 'latest'}${v['no-final-cut'] ? '' : ' (after a final cut, when the machine still answers)'} into writable images: the machine is not protected again until it is reprotected (mobility reprotect)\n`,
      });
    }
    const j = await api(c, 'POST', '/v1/failover', { agent, point: (v.point as string | undefined) ?? 'latest', finalCut: !v['no-final-cut'] });
    const r = j as unknown as FailoverResult;
    out(j, () => `agent ${agent} failed over to ${r.point.id} (${r.point.kind}, ${r.point.takenAt})${r.finalCut.pointId ? ' — the final cut' : ''}${r.finalCut.note ? `; ${r.finalCut.note}` : ''}\n`
      + r.disks.map((d) => `  ${d.diskId}: ${d.location} (${d.method})\n`).join('') + 'replication is stopped; run mobility reprotect on the original machine to fail back\n');
    return EXIT.OK;
  }
  if (cmd === 'reprotect') {
    if (!v['agent-id']) throw new MobilityError('MOB_ERR_USAGE', '--agent-id is required');
    const disksToWrite = parseDisks(v.disk as string[] | undefined);
    const vmImages = Boolean(v['vm-images']);
    if (!v.yes) {
      // what the server says about the failover (best effort: the reprotect itself checks it)
      const fo = await api(c, 'GET', '/v1/status').then((j) => ((j.disks ?? []) as { agent: string; state: string; reason: string }[]).find((d) => d.agent === agent && d.state === 'failed-over')?.reason ?? '', () => '');
      const { confirmDestructive } = await import('./confirm.js');
      await confirmDestructive({
        yes: false, command: 'reprotect',
        summary: `reprotect overwrites these disks of this machine with the promoted images of ${agent}${fo ? ` (${fo})` : ''}: every page that differs is replaced, so whatever was written to them after the failover is lost:\n`
          + disksToWrite.map((d) => `  ${vmImages ? `VM disk image ${d.path}` : d.path} (disk ${d.id})`).join('\n') + '\n',
      });
    }
    const logger = createLogger({ component: 'agent', json: v['json-logs'] ? true : undefined });
    const { reprotect } = await import('../agent/reprotect.js');
    const progress = new ProgressReporter(logger);
    let disks;
    // host mode: the shut-down VM's images, written through a storage daemon's writable FUSE exports
    const host = vmImages ? await (await import('../agent/host-reprotect.js')).openHostImagesForWrite(disksToWrite.map((d) => path.resolve(d.path))) : null;
    try {
      const targets = host ? disksToWrite.map((d, i) => ({ path: host.paths[i]!, id: d.id })) : disksToWrite;
      // a registered machine (or a VM of a host agent) replicates only with its agent's certificate
      const creds = v['agent-state'] === undefined ? null : await (await import('../agent/config.js')).loadCredentials(path.resolve(v['agent-state'] as string));
      disks = await reprotect({ serverUrl: c.url.toString(), token: c.token, ca: creds?.ca ?? c.ca, pin: c.pin, agentId: agent, disks: targets, logger, ...(creds ? { cert: creds.cert, key: creds.key } : {}),
        onProgress: (p) => progress.update({ diskId: p.diskId, kind: 'reprotect', done: p.done, total: p.total, stats: { bytesSent: 0 } }) });
      if (host) disks = disks.map((d, i) => ({ ...d, path: disksToWrite[i]!.path }));
    } finally {
      progress.end();
      await host?.close();
    }
    const fb = await api(c, 'POST', '/v1/failback', { agent });
    out({ disks, failback: fb }, () => disks.map((d) => `${d.diskId}: ${d.path} now equals its promoted image: ${d.pagesPulled} pages (${fmtBytes(d.bytesPulled)}) pulled of ${fmtBytes(d.sizeBytes)} in ${(d.ms / 1000).toFixed(1)} s`).join('\n')
      + `\nfailed back: the promoted images are the replicas now; run mobility protect again\n`);
    return EXIT.OK;
  }
  const checks = await testFailoverCheckOptions(v);
  if (v.group !== undefined && (checks.networkMap !== undefined || checks.bootCheck !== undefined)) {
    throw new MobilityError('MOB_ERR_USAGE', 'a network mapping or boot check of a group runs per machine, in boot order: use a recovery plan (mobility recovery-plan test-failover)');
  }
  const body = { ...(v.group !== undefined ? { group: v.group } : { agent }), point: (v.point as string | undefined) ?? 'latest', cleanup: Boolean(v.cleanup), ...checks };
  let j: Record<string, unknown>;
  const logger = createLogger({ component: 'cli', json: v['json-logs'] ? true : undefined });
  if (v.download === undefined && !checks.bootCheck) j = await api(c, 'POST', '/v1/test-failover', body);
  else j = await testFailoverStreamed(c, { ...body, ...(v.download === undefined ? {} : { download: path.resolve(v.download as string) }) }, logger);
  if (v.group !== undefined) {
    const g = j as unknown as import('../server/http/api.js').GroupTestFailoverResult;
    out(j, () => `group ${g.group}, group point ${g.point} (${g.kind}, ${g.takenAt}): ${g.removed ? 'images removed' : 'every machine materialised at it'}\n`
      + g.machines.map((m) => `machine ${m.agentId}: ` + formatTestFailover(m)).join(''));
    return EXIT.OK;
  }
  out(j, () => formatTestFailover(j as unknown as TestFailoverResult));
  const boot = (j as unknown as TestFailoverResult).record?.bootCheck;
  return boot && !boot.ok ? EXIT.ERROR : EXIT.OK;
}

/** The network mapping and boot check options of test-failover, as the request body carries them (the mapping file is read here). */
async function testFailoverCheckOptions(v: Values): Promise<{ networkMap?: unknown; bootCheck?: Record<string, unknown> }> {
  const bootOpts = ['boot-marker', 'boot-timeout', 'boot-bus', 'boot-accel', 'boot-network', 'boot-disk'].filter((k) => v[k] !== undefined);
  if (bootOpts.length && !v['boot-check']) throw new MobilityError('MOB_ERR_USAGE', `--${bootOpts[0]} goes with --boot-check`);
  if (v.cleanup && (v['boot-check'] || v['network-map'] !== undefined)) throw new MobilityError('MOB_ERR_USAGE', '--boot-check and --network-map go with making images, not with --cleanup');
  const out: { networkMap?: unknown; bootCheck?: Record<string, unknown> } = {};
  if (v['network-map'] !== undefined) {
    const file = v['network-map'] as string;
    let text: string;
    try { text = await fsp.readFile(file, 'utf8'); } catch (err) {
      throw new MobilityError('MOB_ERR_CONFIG', `cannot read the network mapping ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    try { out.networkMap = JSON.parse(text) as unknown; } catch (err) {
      throw new MobilityError('MOB_ERR_NETWORK_MAP', `network mapping ${file} is not JSON: ${(err as Error).message}`);
    }
    // checked here too, so a mistake is reported before the server makes anything
    const { parseNetworkMapping } = await import('../server/recovery/network-mapping.js');
    parseNetworkMapping(out.networkMap);
  }
  if (v['boot-check']) {
    const b: Record<string, unknown> = {};
    if (v['boot-marker'] !== undefined) {
      const { compileMarker } = await import('../server/recovery/boot-check.js');
      compileMarker(v['boot-marker'] as string);
      b.marker = v['boot-marker'];
    }
    if (v['boot-timeout'] !== undefined) b.timeoutMs = parseDuration(v['boot-timeout'] as string);
    if (v['boot-bus'] !== undefined) b.bus = v['boot-bus'];
    if (v['boot-accel'] !== undefined) b.accel = v['boot-accel'];
    if (v['boot-network'] !== undefined) b.network = v['boot-network'];
    if (v['boot-disk'] !== undefined) b.disk = v['boot-disk'];
    out.bootCheck = b;
  }
  return out;
}

type TestFailoverResult = import('../server/http/api.js').TestFailoverResult;
type TestFailoverRecord = import('../server/recovery/test-failover-record.js').TestFailoverRecord;
type FailoverResult = import('../server/failover.js').FailoverResult;

/**
 * POST /v1/test-failover with a download, streamed: the server answers newline-delimited JSON,
 * progress lines while it writes the files, then the result or the error. Progress goes to
 * stderr; an error line fails the command with its code. Returns the result as the plain
 * (unstreamed) answer would be.
 */
async function testFailoverStreamed(c: ApiConn, body: Record<string, unknown>, logger: Logger): Promise<Record<string, unknown>> {
  const progress = new ProgressReporter(logger);
  let result: Record<string, unknown> | null = null;
  try {
    for await (const line of apiStream(c, 'POST', '/v1/test-failover', { ...body, stream: true })) {
      if (line.type === 'progress') {
        progress.update({ diskId: String(line.disk), kind: 'download', done: Number(line.doneBytes), total: Number(line.totalBytes) });
      } else if (line.type === 'console') {
        // the booting guest's serial console, as it comes
        progress.end();
        process.stderr.write(`[${String(line.disk)}] ${String(line.line)}\n`);
      } else if (line.type === 'error') {
        const code = typeof line.code === 'string' && isErrorCode(line.code) ? line.code : 'MOB_ERR_INTERNAL';
        throw new MobilityError(code, `server: ${String(line.message ?? 'test failover failed')}`);
      } else if (line.type === 'result' || line.type === undefined) {
        // undefined: a server that answered without streaming
        const { type: _type, ...rest } = line;
        result = rest;
      }
    }
  } finally {
    progress.end();
  }
  if (!result) throw new MobilityError('MOB_ERR_UNREACHABLE', `the server ended its answer without a result (${c.url.host}); the images may still have been made: run test-failover --cleanup to remove them`);
  return result;
}

/** Status lines: the last test failover of each agent that mapped a network or booted. */
function testFailoverLines(recs: TestFailoverRecord[]): string {
  if (!recs.length) return '';
  return 'last test failovers:\n' + recs.map((r) => {
    const b = r.bootCheck;
    const boot = b ? (b.ok ? `booted in ${b.seconds} s (${b.accel})` : `DID NOT BOOT (${b.reason} after ${b.seconds} s): ${b.tail.slice(-1)[0] ?? ''}`) : r.error ? `${r.error.step} failed: ${r.error.code}` : 'no boot check';
    const net = r.networkMapping ? `, network mapped (${r.networkMapping.stack}, ${r.networkMapping.nics.length} NIC)` : '';
    return `  ${r.agent} ${r.point} at ${r.at}: ${boot}${net}\n`;
  }).join('');
}

function formatTestFailover(r: TestFailoverResult): string {
  if (r.removed) {
    return r.disks.length
      ? `removed the test-failover images of ${r.point.id}:\n` + r.disks.map((d) => `  ${d.diskId}: ${d.location}\n`).join('')
      : `no test-failover images of ${r.point.id} to remove\n`;
  }
  const warn = r.point.suspect ? `WARNING: ${r.point.id} is suspect on ${r.point.suspect.disks.join(', ')}: ${r.point.suspect.reason}; prefer a point recorded after the repair\n` : '';
  const downloads = r.downloads ?? [];
  return `${warn}recovery point ${r.point.id} (${r.point.kind}, ${r.point.takenAt}) materialised:\n`
    + r.disks.map((d) => {
      const dl = downloads.filter((x) => x.diskId === d.diskId).map((x) => `    downloaded to ${x.file} (${fmtBytes(x.bytes)} in ${(x.ms / 1000).toFixed(1)} s)\n`).join('');
      return `  ${d.diskId}: ${d.location} (${d.method}${d.undoRecords ? `, ${d.undoRecords} undo records` : ''}, ${d.ms} ms)\n${dl}`;
    }).join('')
    + (downloads.length ? 'the downloaded files are on the server machine\n' : '')
    + (r.record ? formatChecks(r.record) : '');
}

/** The network mapping and boot check of a test failover, for people. */
export function formatChecks(rec: TestFailoverRecord): string {
  const lines: string[] = [];
  const m = rec.networkMapping;
  if (m) {
    lines.push(`network mapping written to disk ${m.diskId}${m.partition === null ? '' : ` (partition ${m.partition})`} for ${m.stack}:`);
    for (const n of m.nics) lines.push(`  ${n.mac}${n.name ? ` (${n.name})` : ''}: ${n.source} -> ${n.dhcp ? 'DHCP' : n.address}${n.gateway ? ` via ${n.gateway}` : ''}${n.dns.length ? `, DNS ${n.dns.join(' ')}` : ''}`);
    for (const n of m.unmapped) lines.push(`  ${n.mac}${n.name ? ` (${n.name})` : ''}: in no mapped network, left as it was`);
    for (const f of m.files) lines.push(`  wrote ${f}`);
  }
  const b = rec.bootCheck;
  if (b) {
    lines.push(b.ok
      ? `boot check: booted in ${b.seconds} s (${b.accel}, ${b.bus}, network ${b.network}): ${JSON.stringify(b.markerLine)}`
      : `boot check FAILED (${b.accel}, ${b.bus}): ${b.reason === 'timeout' ? `no marker /${b.marker}/ within ${b.seconds} s` : b.reason === 'exited' ? `QEMU exited (code ${String(b.exitCode)}) after ${b.seconds} s before the marker /${b.marker}/` : 'aborted'}; last console lines:`);
    if (!b.ok) for (const l of b.tail) lines.push(`  | ${l}`);
  }
  if (rec.error) lines.push(`${rec.error.step} failed: ${rec.error.code}: ${rec.error.message}`);
  return lines.map((l) => l + '\n').join('');
}

async function cmdReplicate(argv: string[], verify: boolean): Promise<number> {
  const { values: v } = parse(argv, verify ? CONN_OPTS : {
    ...CONN_OPTS, mode: { type: 'string' }, 'block-size': { type: 'string' }, 'no-compress': { type: 'boolean' }, compress: { type: 'string' }, 'max-rate': { type: 'string' },
  });
  if (v.help) { process.stdout.write(verify ? HELP.verify : HELP.replicate); return EXIT.OK; }
  const { url, token, ca } = await connOptions(v);
  const mode = (verify ? 'verify' : ((v.mode as string | undefined) ?? 'auto')) as ReplicateMode;
  if (!['auto', 'initial', 'incremental', 'resync', 'verify'].includes(mode)) throw new MobilityError('MOB_ERR_USAGE', `--mode must be auto, initial, incremental or resync`);
  const blockSize = parseBlockSize(v);
  const agentId = (v['agent-id'] as string | undefined) ?? defaultAgentId();
  const retryDeadline = v['retry-deadline'] === undefined ? undefined : Number(v['retry-deadline']);
  if (retryDeadline !== undefined && !(retryDeadline >= 0)) throw new MobilityError('MOB_ERR_USAGE', `--retry-deadline wants seconds, got ${String(v['retry-deadline'])}`);
  const logger = createLogger({ component: 'agent', json: v['json-logs'] ? true : undefined });
  const progress = new ProgressReporter(logger);
  let results: DiskResult[];
  try {
    results = await replicate({
      serverUrl: url.toString(), token, ca, pin: v.pin as string | undefined, agentId, disks: parseDisks(v.disk as string[] | undefined),
      stateDir: path.resolve((v['state-dir'] as string | undefined) ?? 'mobility-agent'), mode, blockSize,
      compress: compressMode(v), maxRateBytes: v['max-rate'] ? parseSize(v['max-rate'] as string) : undefined,
      retryDeadlineMs: retryDeadline === undefined ? undefined : retryDeadline * 1000, logger,
      onProgress: (p) => progress.update(p),
    });
  } finally {
    progress.end();
  }
  if (v.json) process.stdout.write(JSON.stringify({ agentId, disks: results, resources: resources() }, null, 2) + '\n');
  else {
    for (const r of results) {
      const s = r.stats;
      if (r.kind === 'verify') {
        process.stdout.write(`${r.diskId}: ${s.mismatches.length === 0 ? 'replica matches the source' : `${fmtBytes(s.mismatchBytes)} differ in ${s.mismatches.length} range(s)`} (${fmtBytes(s.bytesScanned)} compared in ${(r.durationMs / 1000).toFixed(1)} s)\n`);
        for (const m of s.mismatches.slice(0, 50)) process.stdout.write(`  differs: offset ${m.offset} length ${m.length}\n`);
        if (s.mismatches.length > 50) process.stdout.write(`  ... ${s.mismatches.length - 50} more\n`);
      } else {
        process.stdout.write(`${r.diskId}: ${r.kind} (${r.reason}) done in ${(r.durationMs / 1000).toFixed(1)} s: scanned ${fmtBytes(s.bytesScanned)}, shipped ${s.blocksSent} blocks / ${s.pagesSent} pages (${fmtBytes(s.bytesChanged)} of data as ${fmtBytes(s.bytesSent)} on the wire), ${r.reconnects} reconnect(s)\n`);
      }
    }
  }
  if (verify && results.some((r) => r.stats.mismatches.length > 0)) return EXIT.MISMATCH;
  return EXIT.OK;
}

/** The commands runAdmin (admin.ts) handles. */
const ADMIN_COMMANDS = new Set(['register', 'agent', 'preflight', 'passphrase', 'token', 'machines', 'policy', 'enable', 'disable', 'cut', 'group', 'push-install', 'push-account',
  'login', 'logout', 'profiles']);

/** The help text of a command (main.ts's own or admin.ts's); undefined for an unknown one. */
async function helpFor(cmd: string): Promise<string | undefined> {
  if (cmd !== 'main' && Object.prototype.hasOwnProperty.call(HELP, cmd)) return HELP[cmd];
  if (cmd === 'operator') return (await import('./operator-cli.js')).OPERATOR_HELP;
  if (ADMIN_COMMANDS.has(cmd)) return (await import('./admin.js')).adminHelp(cmd);
  if (cmd === 'capacity') return (await import('./capacity-cli.js')).CAPACITY_HELP;
  if (cmd === 'recovery-plan') return (await import('./plan-cli.js')).PLAN_HELP;
  return undefined;
}

/** --help or -h anywhere among a command's arguments (before a -- that ends the options). */
function wantsHelp(args: string[]): boolean {
  for (const a of args) {
    if (a === '--') return false;
    if (a === '--help' || a === '-h') return true;
  }
  return false;
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  try {
    // every command and subcommand: its help on stdout, exit 0, whatever else was given
    if (cmd !== undefined && wantsHelp(rest)) {
      const text = await helpFor(cmd);
      if (text !== undefined) { process.stdout.write(text); return EXIT.OK; }
    }
    // the process server streams disk data through a small heap: fewer full collections (util/heap-tuning.ts)
    if (cmd === 'server') tuneHeapForStreaming();
    switch (cmd) {
      case 'server': return await cmdServer(rest);
      case 'replicate': return await cmdReplicate(rest, false);
      case 'verify': return await cmdReplicate(rest, true);
      case 'protect': return await cmdProtect(rest);
      case 'status': case 'points': case 'test-failover': case 'failover': case 'reprotect': case 'events': case 'alerts': return await cmdOps(cmd, rest);
      case 'version': case '--version': case '-V':
        process.stdout.write(`mobility ${AGENT_VERSION} (protocol ${PROTOCOL_VERSION})\n`);
        return EXIT.OK;
      case 'register': case 'agent': case 'preflight': case 'passphrase': case 'token': case 'machines': case 'policy':
      case 'enable': case 'disable': case 'cut': case 'group': case 'push-install': case 'push-account': case 'login': case 'logout': case 'profiles': {
        const { runAdmin } = await import('./admin.js');
        return await runAdmin(cmd, rest);
      }
      case 'capacity': return await (await import('./capacity-cli.js')).cmdCapacity(rest);
      case 'recovery-plan': return await (await import('./plan-cli.js')).cmdRecoveryPlan(rest);
      case 'operator': return await (await import('./operator-cli.js')).runOperator(rest);
      case 'demo': {
        const { values: v } = parse(rest, { dir: { type: 'string' }, size: { type: 'string' }, keep: { type: 'boolean' }, files: { type: 'boolean' } });
        if (v.help) { process.stdout.write(HELP.demo); return EXIT.OK; }
        if (v.size !== undefined && !v.files && (await import('./demo-full.js')).fullDemoBlocker() === null) throw new MobilityError('MOB_ERR_USAGE', '--size goes with --files (the whole-product demo uses a 128 MiB loop device)');
        if (!v.files) {
          const full = await import('./demo-full.js');
          const why = full.fullDemoBlocker();
          if (why === null) return await full.runFullDemo({ dir: v.dir as string | undefined, keep: Boolean(v.keep) });
          process.stdout.write(`the whole-product demo needs root, tracefs and a few tools: ${why}; running the file-based demo instead\n`);
        }
        const { runDemo } = await import('./demo.js');
        return await runDemo({ dir: v.dir as string | undefined, size: v.size ? parseSize(v.size as string) : undefined, keep: Boolean(v.keep) });
      }
      case 'help': {
        // mobility help COMMAND: that command's help
        if (rest[0] !== undefined) {
          const text = await helpFor(rest[0]);
          if (text === undefined) throw new MobilityError('MOB_ERR_USAGE', `unknown command ${rest[0]}; see 'mobility --help'`);
          process.stdout.write(text);
          return EXIT.OK;
        }
        process.stdout.write(HELP.main);
        return EXIT.OK;
      }
      case undefined: case '--help': case '-h':
        process.stdout.write(HELP.main);
        return cmd === undefined ? EXIT.USAGE : EXIT.OK;
      default:
        throw new MobilityError('MOB_ERR_USAGE', `unknown command ${cmd}; see 'mobility --help'`);
    }
  } catch (err) {
    const e = toMobilityError(err);
    process.stderr.write(`mobility: ${e.code}: ${e.message}\n`);
    return exitCodeFor(e.code);
  }
}

const isEntry = process.argv[1] && /(?:main\.js|mobility(?:\.js)?)$/.test(process.argv[1]);
if (isEntry) {
  if (process.argv[2] !== 'server') process.once('SIGINT', () => process.exit(EXIT.INTERRUPTED));
  main(process.argv.slice(2)).then((code) => process.exit(code));
}
