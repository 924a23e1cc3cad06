/**
 * Configuration-server and agent-lifecycle commands of the `mobility` CLI:
 * passphrase, token, register, agent, preflight, machines, policy, enable,
 * disable, cut, push-install, push-account; and the operator's profiles (login,
 * logout, profiles: profile.ts keeps them).
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { DEFAULT_PORT } from '../constants.js';
import { MobilityError } from '../errors.js';
import { EXIT, compressMode, parse, parseDuration, parseSize, readSecretFile, type Values } from './args.js';
import { CONN_HELP, CONN_OPTIONS, api, fmtAge, resolveConn, serverConn } from './api-client.js';
import { confirmDestructive } from './confirm.js';
import { configDir, profileFile, profileNames, readProfile, removeProfile, saveProfile, selectProfile, trustOf } from './profile.js';
import { fmtBytes, table } from './progress.js';
import { formatHostVms, type MachineVmRow } from './vm-format.js';

const HELP: Record<string, string> = {
  passphrase: `Usage: mobility passphrase show|rotate [--data-dir DIR]

The registration passphrase agents present to 'mobility register' (pull install).
The server creates it on first start in DATA-DIR/passphrase (mode 0600). rotate
replaces it at once (a running server uses the new one for the next registration);
registered agents keep working: they authenticate with their own certificates.
`,
  token: `Usage: mobility token create [--label TEXT] [--ttl D] [--data-dir DIR | --token-file F (--ca F | --pin SHA256) | --profile NAME] [--server URL] [--json]

Mints a one-time registration token (valid once, for --ttl, default 24h). Push install
mints one per host itself; use this for installs you run by hand.
${CONN_HELP}`,
  register: `Usage: mobility register --server wss://HOST:PORT (--passphrase-file F | --token-file F) (--config F | --state-dir DIR) [--pin SHA256] [--machine-id-file F] [--replace]

Registers this machine's agent. The server proves it knows the secret before the
secret is sent; its certificate is then pinned. The agent's key never leaves the
machine; its certificate, the server CA and the identity go to the state directory
(mode 0600). Registering again keeps the agent's identity; a cloned machine (same
identity, different machine id) is refused with MOB_ERR_CLONE. A second installation
on this machine (another state directory) is refused with MOB_ERR_AGENT_EXISTS while
the registered one is connected: --replace takes the identity over (the other one's
certificate stops working and its protection stops).
`,
  agent: `Usage: mobility agent --config F [--pid-file F] [--json-logs]

The Mobility service (run by systemd: see install.sh). Keeps a control connection to
the server, reports inventory, runs preflight checks on request, and protects the disks
the server assigns under their policy. SIGTERM drains and persists state; SIGHUP
reloads the configuration; SIGUSR1 asks for an app-consistent cut now, SIGUSR2 for a
crash-consistent one (logged and ignored when nothing is protected). Logs: JSON to the config's logFile (rotated, 10 MiB x 5)
and stderr (readable lines on a terminal).
`,
  preflight: `Usage: mobility preflight [--server URL] [--state-dir DIR] [--disk DEV]... [--json]
       mobility preflight --qmp SOCKET --node NAME... [--run-dir DIR] [--guest-agent SOCKET] [--state-dir DIR] [--json]

Checks this machine can run the agent: root, OS/kernel/arch, Node.js, free space for the
agent state, tracefs, and with --server the server port and clock skew; with --disk each
disk (block device, size within limits). Exit 0 when all pass, 3 otherwise; every failure
has a MOB_ERR_PRE_* code and says how to fix it.

Host mode (--qmp): checks that a running QEMU can serve the QEMU change tracker instead of
tracefs: its QMP socket answers, QEMU is 6.0 or later with FUSE exports (and /dev/fuse),
nbdinfo runs, each --node is a writable format node that takes a dirty bitmap (qcow2 keeps
tracking across a QEMU restart; raw does not, and the check says so), and --run-dir (default:
the socket's directory) has room for point-in-time views; plus root, Node.js and free space.
With --guest-agent (the VM's guest agent socket, e.g. Proxmox's /var/run/qemu-server/VMID.qga),
for app-consistent points: the QEMU guest agent answers guest-ping and has its fsfreeze
commands enabled.
`,
  machines: `Usage: mobility machines [--data-dir DIR | --token-file F (--ca F | --pin SHA256) | --profile NAME] [--server URL] [--json]

Registered machines: connection, policy, protected disks, and the inventory the agent
reports (OS, kernel, CPU, memory, disks, IPs). A host agent's VMs are listed under it, indented:
name, machine id, run state, disks (device, node, format, size) and protection; --json nests
them (machines[].vms).
${CONN_HELP}`,
  policy: `Usage:
  mobility policy create NAME [--rpo D] [--retention D] [--crash-interval D] [--app-interval D] [--compress MODE] [--max-rate N]
                              [--freeze-limit D] [--spool-budget SIZE]
  mobility policy list
  mobility policy assign --machine M --policy NAME
(each with [--data-dir DIR | --token-file F (--ca F | --pin SHA256) | --profile NAME] [--server URL])

A policy governs all the disks of a machine (they form one consistency group):
  --rpo D             alert when the newest recovery point is older (default 15m)
  --retention D       keep recovery points this long (default 24h)
  --crash-interval D  crash-consistent cuts (default 5m, at least 15s)
  --app-interval D    app-consistent cuts (default 1h; 0 = none)
  --compress MODE     auto (default): lz4 while the network is the bottleneck or a --max-rate
                      is set, raw when the link keeps up; always; never (= --no-compress)
  --max-rate N        bandwidth limit in bytes/s (e.g. 50M; default unlimited)
  --freeze-limit D    longest freeze of a cut (default 10s, at least 100ms); past it the cut is
                      abandoned and retried
  --spool-budget SIZE most a cut reads into its spool while frozen (default 256M, at least 64K);
                      a larger remainder converges further before the next freeze
Creating an existing policy updates it; the agents under it get the change at once.
${CONN_HELP}`,
  enable: `Usage: mobility enable --machine M --disk DEV [--disk-id ID] [--policy NAME] [--profile-only] [--data-dir DIR | --token-file F (--ca F | --pin SHA256) | --profile NAME] [--server URL]
       mobility enable --machine HOST --vm NAME [--policy NAME] [...]

Runs the preflight checks for DEV on the machine's agent, then assigns the disk: the agent
starts its initial replication at once (pushed over its control connection).
  --profile-only   measure instead of protect (capacity planning): the agent tracks the disk's
                   writes and reports its churn and a sampled compression ratio to the server
                   every 10 s (agent.json profileIntervalMs); nothing is replicated, no replica
                   or recovery point is made. See mobility capacity. Enabling the disk again
                   without --profile-only protects it (its profiling ends, the samples stay);
                   mobility disable ends profiling and deletes nothing.
  --vm NAME        host mode: protect every disk of VM NAME of host agent HOST (as its last
                   inventory reports it: mobility machines) as one machine, <HOST>.<NAME>, whose
                   disks are cut together; CD-ROMs and empty drives are left out. The host runs
                   QEMU's preflight for the VM first. Status, points, cut, test-failover,
                   failover and disable then name the VM's machine (--machine HOST.NAME).
                   Fails with MOB_ERR_UNKNOWN_VM (3) when HOST reports no such VM (the message
                   lists those it reports) or is not a host agent (agent.json vmSockets).
${CONN_HELP}`,
  disable: `Usage: mobility disable --machine M --disk ID|DEV [--keep-replica] [--yes] [--data-dir DIR | --token-file F (--ca F | --pin SHA256) | --profile NAME] [--server URL] [--json]

Stops protecting the disk: the agent drops its tracking state, and the server deletes the
replica, with the test-failover images made from it; disabling the machine's last disk
deletes all its replicas, recovery points and test-failover images. This cannot be undone:
on a terminal the command shows what will be deleted (disks, replica sizes, points, images)
and asks; elsewhere it refuses (MOB_ERR_USAGE, exit 2, nothing changed) unless --yes is given.
--keep-replica only stops protection, keeps everything and does not ask. A failed-over
machine (its promoted images are live disks) is refused with MOB_ERR_FAILED_OVER unless
--keep-replica.
${CONN_HELP}`,
  cut: `Usage: mobility cut --machine M [--kind crash|app] [--timeout D] [--data-dir DIR | --token-file F (--ca F | --pin SHA256) | --profile NAME] [--server URL] [--json]

Asks the machine's agent for a consistency cut now (over its control connection) and waits
until the recovery point is recorded: prints its id on stdout (details on stderr), or with
--json the point as JSON. --kind crash (the default) freezes the filesystems, ships the
remainder and thaws; --kind app also runs the hooks (pre-freeze, post-thaw). The answer is
the first point of that kind frozen after the agent received the request.
  --timeout D   wait at most this long (default 120s); the request stays queued on the agent
Fails with: MOB_ERR_UNKNOWN_MACHINE (3), MOB_ERR_NOT_PROTECTING (3: no disk enabled, or its
protection is not running), MOB_ERR_AGENT_OFFLINE (5), MOB_ERR_FAILED_OVER (1), the cut's own
code when it failed (MOB_ERR_FREEZE, MOB_ERR_CUT, ...; MOB_ERR_HOOK when an app cut was
downgraded to crash by a failing pre-freeze hook) (1), MOB_ERR_CUT_TIMEOUT (5).
${CONN_HELP}`,
  group: `Usage: mobility group create NAME --machine M... [--interval D|off] [--bound D] [--kind crash|app]
       mobility group list | delete NAME | cut NAME [--kind crash|app]
       [--data-dir DIR | --token-file F (--ca F | --pin SHA256) | --profile NAME] [--server URL] [--json]

A consistency group: up to 16 machines whose recovery points are cut together, so that an
application spread over them (web, app, database) recovers to one instant on every machine.
The configuration server coordinates each group cut over the agents' control connections:
every agent converges, freezes and reads its remainder, reports ready while frozen; when all
are ready the server commits and each agent records its point, labelled with the group point
id (the same on every machine). A machine that does not answer a step within the bound, or
fails or disconnects, aborts the group cut: every machine thaws, nothing is recorded, and the
error names the machine. Each machine keeps its own policy and its own points (unlabelled);
a group cut counts as the machine's latest cut, so with a group interval at most the policy's
crash interval the group points replace the machine's own.
  create NAME   create the group, or replace its machines and settings:
    --machine M   a member (agent id or host name); repeat, at most 16; a machine is in at
                  most one group
    --interval D  cut the group every D (at least 15s), when every member is connected;
                  off (the default) = only on demand
    --bound D     how long every machine has to answer the freeze step (freeze, read the
                  remainder, frozen hooks) before the cut is aborted (default 5s)
    --kind K      what scheduled group cuts are: crash (default) or app (hooks run)
  list          the groups, their members and whether each is connected
  delete NAME   remove the group (no data is deleted; its points keep their labels)
  cut NAME      a group cut now: prints the group point id on stdout (each machine's point
                on stderr), or fails with MOB_ERR_GROUP_CUT naming the machine (exit 1)
See also: mobility points --group NAME, mobility test-failover --group NAME.
Fails with: MOB_ERR_UNKNOWN_GROUP (3), MOB_ERR_GROUP_TOO_LARGE (3), MOB_ERR_UNKNOWN_MACHINE (3),
MOB_ERR_NOT_PROTECTING (3), MOB_ERR_GROUP_BUSY (1), MOB_ERR_GROUP_CUT (1).
${CONN_HELP}`,
  'push-install': `Usage: mobility push-install --host H[:PORT]... --user U (--key F | --password-file F | --account NAME) [options]

Installs the agent on Linux hosts over SSH, in parallel: connect, remote preflight
(root or passwordless sudo, Linux x86_64/aarch64, Node.js 20+, free space), upload the
bundle over SFTP, run install.sh with a one-time token, wait until the agent connects.
Each host ends with ok or a MOB_ERR_PUSH_* code (docs/errors.md). Exit 0 only when every
host succeeded.

Options:
  --host H[:PORT]     repeatable; or --hosts-file F (one per line)
  --port P            SSH port (default 22)
  --user U            account (root, or one with passwordless sudo)
  --key F             private key file; --password-file F: file holding the password
  --account NAME      a stored push account (mobility push-account add)
  --host-key SHA256   expected host key fingerprint (default: trust on first use)
  --bundle F          default dist/bundle/mobility-agent-*.tar.gz
  --prefix DIR        install root on the hosts (default /)
  --parallel N        hosts at a time (default 4)
  --timeout D         wait for the agent to connect (default 2m)
  --server URL        the address agents use to reach this server (default wss://127.0.0.1:${DEFAULT_PORT})
  --data-dir DIR      the server's data directory (token, CA, push accounts)
  --json              results as JSON
`,
  login: `Usage: mobility login (--token-file F (--ca F | --pin SHA256) | --data-dir DIR) [--server URL] [--profile NAME] [--json]
       mobility login --list [--json]      (the same as mobility profiles)

Checks the connection for real (an authenticated request to the server), then saves it as a
profile, so that the operator commands (status, points, machines, policy, cut, ...) need no
connection options. The profile is the file CONFIG-DIR/profiles/NAME.json (mode 0600, in a
directory of mode 0700, written atomically); it holds the server address, a copy of the CA
certificate (or the pin) and the server's token (the operator credential): guard it like the
token file. CONFIG-DIR is $MOBILITY_CONFIG_DIR, else $XDG_CONFIG_HOME/mobility, else
~/.config/mobility.

A refused token, CA or pin fails with the code every command gives (MOB_ERR_AUTH or
MOB_ERR_TLS_PIN, exit 4; MOB_ERR_UNREACHABLE, exit 5) and saves nothing. Logging in again
under a name replaces that profile. The token is never printed.

Options:
  --token-file F   a copy of the server's DATA-DIR/token, with
  --ca F           the server's CA (a copy of DATA-DIR/tls/ca.pem; copied into the profile), or
  --pin SHA256     the fingerprint of the server certificate (printed at its start)
  --data-dir DIR   on the server: its token (DIR/token) and CA (DIR/tls/ca.pem), copied
  --server URL     wss://HOST:PORT (ws:// for a --no-tls server); default wss://127.0.0.1:${DEFAULT_PORT}
  --profile NAME   the profile to save: default $MOBILITY_PROFILE, else 'default' (the one
                   commands given no connection options use)
  --list           list the saved profiles instead
  --json           what was saved (never the token) as JSON
`,
  logout: `Usage: mobility logout [--profile NAME]

Removes the profile NAME (default $MOBILITY_PROFILE, else 'default'), token and all. A profile
that does not exist is MOB_ERR_CONFIG (exit 3). Nothing changes on the server: the token stays
valid for whoever holds a copy of it.
`,
  profiles: `Usage: mobility profiles [--json]

Lists the profiles saved by mobility login (also: mobility login --list): NAME (* marks the one
commands given no connection options use: $MOBILITY_PROFILE, else 'default'), SERVER, TRUST
(the SHA-256 fingerprint of the saved CA certificate, or the pin) and SAVED AT. Never the token.
A profile that cannot be used (e.g. its file is readable by group or others) is listed as
unusable, with its coded error on stderr.
`,
  'push-account': `Usage:
  mobility push-account add --name N --user U (--key F | --password-file F) [--data-dir DIR]
  mobility push-account list [--data-dir DIR]
  mobility push-account remove --name N [--data-dir DIR]

Push accounts live in the server's database, their secrets sealed with AES-256-GCM under
DATA-DIR/secrets.key (0600). They are never printed or logged.
`,
};

interface DisablePlan {
  lastDisk: boolean;
  replicas: { diskId: string; sizeBytes: number; allocatedBytes: number | null }[];
  points: number;
  pointsNamingDisk: number;
  testFailoverImages: { point: string; diskId: string; path: string; allocatedBytes: number }[];
}

function fmtDisablePlan(p: DisablePlan): string {
  const lines: string[] = [];
  if (!p.replicas.length) lines.push('  no replica (nothing was replicated yet)');
  for (const r of p.replicas) lines.push(`  replica of disk ${r.diskId}: ${fmtBytes(r.sizeBytes)} disk, ${r.allocatedBytes === null ? 'size not counted yet' : fmtBytes(r.allocatedBytes)} in the replica store (replica and its points)`);
  if (p.lastDisk) lines.push(`  ${p.points} recovery point(s): the machine's last protected disk, so all of them`);
  else lines.push(`  its undo journals: ${p.pointsNamingDisk} recovery point(s) that name it stay, but can no longer be materialised for it`);
  if (!p.testFailoverImages.length) lines.push('  no test-failover images');
  for (const i of p.testFailoverImages) lines.push(`  test-failover image of ${i.point}, disk ${i.diskId}: ${i.path} (${fmtBytes(i.allocatedBytes)})`);
  return lines.join('\n') + '\n';
}

const CONN = { ...CONN_OPTIONS, json: { type: 'boolean' } } as const;

/** The server's data directory, for what these commands read or write there themselves (passphrase, push accounts). */
function dataDir(v: Values): string {
  return path.resolve((v['data-dir'] as string | undefined) ?? 'mobility-data');
}

/** The help text of a command of this module (undefined for one it does not have). */
export function adminHelp(cmd: string): string | undefined {
  return Object.prototype.hasOwnProperty.call(HELP, cmd) ? HELP[cmd] : undefined;
}

const durOpt = (v: Values, k: string): number | undefined => (v[k] === undefined ? undefined : parseDuration(v[k] as string));

export async function runAdmin(cmd: string, argv: string[]): Promise<number> {
  const out = (v: Values, j: unknown, text: () => string) => process.stdout.write(v.json ? JSON.stringify(j, null, 2) + '\n' : text());
  switch (cmd) {
    case 'passphrase': {
      const [sub, ...rest] = argv;
      const { values: v } = parse(rest, { 'data-dir': { type: 'string' } });
      if (v.help || !['show', 'rotate'].includes(sub)) { process.stdout.write(HELP.passphrase); return v.help ? EXIT.OK : EXIT.USAGE; }
      const { ensurePassphrase, rotatePassphrase, passphraseFile } = await import('../server/registry.js');
      const dir = dataDir(v);
      if (sub === 'show') {
        try { await fsp.access(dir); } catch { throw new MobilityError('MOB_ERR_CONFIG', `no server data directory at ${dir} (give --data-dir)`); }
        process.stdout.write((await ensurePassphrase(dir)) + '\n');
      } else {
        const p = await rotatePassphrase(dir);
        process.stdout.write(p + '\n');
        process.stderr.write(`the passphrase in ${passphraseFile(dir)} was replaced; the old one no longer registers agents\n`);
      }
      return EXIT.OK;
    }
    case 'token': {
      const [sub, ...rest] = argv;
      const { values: v } = parse(rest, { ...CONN, label: { type: 'string' }, ttl: { type: 'string' } });
      if (v.help || sub !== 'create') { process.stdout.write(HELP.token); return v.help ? EXIT.OK : EXIT.USAGE; }
      const j = await api(await serverConn(v), 'POST', '/v1/tokens', { label: v.label ?? '', ttlMs: durOpt(v, 'ttl') });
      out(v, j, () => `${String(j.token)}\n`);
      return EXIT.OK;
    }
    case 'register': {
      const { values: v } = parse(argv, {
        server: { type: 'string' }, 'passphrase-file': { type: 'string' }, 'token-file': { type: 'string' }, config: { type: 'string' },
        'state-dir': { type: 'string' }, pin: { type: 'string' }, 'machine-id-file': { type: 'string' }, json: { type: 'boolean' }, replace: { type: 'boolean' },
      });
      if (v.help) { process.stdout.write(HELP.register); return EXIT.OK; }
      if (Boolean(v['passphrase-file']) === Boolean(v['token-file'])) throw new MobilityError('MOB_ERR_USAGE', 'give exactly one of --passphrase-file and --token-file');
      const kind = v['passphrase-file'] ? 'passphrase' : 'token';
      const secret = await readSecretFile((v['passphrase-file'] ?? v['token-file']) as string, kind === 'passphrase' ? 'passphrase-file' : 'token-file');
      let stateDir = v['state-dir'] ? path.resolve(v['state-dir'] as string) : undefined;
      let machineIdFile = v['machine-id-file'] as string | undefined;
      let server = v.server as string | undefined;
      let pin = v.pin as string | undefined;
      if (v.config) {
        const { loadAgentConfig } = await import('../agent/config.js');
        const c = await loadAgentConfig(v.config as string);
        stateDir ??= c.stateDir;
        machineIdFile ??= c.machineIdFile;
        server ??= c.server;
        pin ??= c.pin;
      }
      if (!stateDir) throw new MobilityError('MOB_ERR_USAGE', 'give --config or --state-dir');
      if (!server) throw new MobilityError('MOB_ERR_USAGE', '--server wss://HOST:PORT is required');
      const { registerAgent } = await import('../install/register.js');
      const r = await registerAgent({ server, stateDir, kind, secret, pin, machineIdFile, replace: v.replace === true });
      out(v, r, () => `${r.reRegistered ? 're-registered' : 'registered'} as agent ${r.agentId} with ${server}; server certificate ${r.serverFingerprint} pinned\n`);
      return EXIT.OK;
    }
    case 'agent': {
      const { values: v } = parse(argv, { config: { type: 'string' }, 'pid-file': { type: 'string' }, 'json-logs': { type: 'boolean' } });
      if (v.help) { process.stdout.write(HELP.agent); return EXIT.OK; }
      if (!v.config) throw new MobilityError('MOB_ERR_USAGE', '--config is required');
      const { AgentDaemon } = await import('../agent/daemon.js');
      process.removeAllListeners('SIGINT');
      const d = new AgentDaemon(path.resolve(v.config as string), { pidFile: v['pid-file'] ? path.resolve(v['pid-file'] as string) : undefined, json: v['json-logs'] ? true : undefined });
      await d.run();
      return EXIT.OK;
    }
    case 'preflight': {
      const { values: v } = parse(argv, {
        server: { type: 'string' }, 'state-dir': { type: 'string' }, disk: { type: 'string', multiple: true }, json: { type: 'boolean' },
        qmp: { type: 'string' }, node: { type: 'string', multiple: true }, 'run-dir': { type: 'string' }, 'guest-agent': { type: 'string' },
      });
      if (v.help) { process.stdout.write(HELP.preflight); return EXIT.OK; }
      const { runPreflight, formatPreflight } = await import('../install/preflight.js');
      const stateDir = path.resolve((v['state-dir'] as string | undefined) ?? '/var/lib/mobility');
      let checks: import('../install/preflight.js').PreflightCheck[];
      if (v.qmp !== undefined) {
        const nodes = (v.node as string[] | undefined) ?? [];
        if (nodes.length === 0) throw new MobilityError('MOB_ERR_USAGE', 'preflight --qmp needs at least one --node NAME (the disks\' format nodes; query-named-block-nodes lists them)');
        if (v.disk !== undefined) throw new MobilityError('MOB_ERR_USAGE', 'preflight --qmp checks QEMU block nodes (--node), not block devices (--disk)');
        const { runHostPreflight } = await import('../install/host-preflight.js');
        const base = await runPreflight({ serverUrl: v.server as string | undefined, stateDir, only: ['root', 'node', 'disk-space', ...(v.server ? ['server-port', 'clock'] : [])] });
        checks = [...base, ...await runHostPreflight({ qmpSocket: path.resolve(v.qmp as string), nodes, runDir: v['run-dir'] === undefined ? undefined : path.resolve(v['run-dir'] as string),
          guestAgentSocket: v['guest-agent'] === undefined ? undefined : path.resolve(v['guest-agent'] as string) })];
      } else {
        if (v.node !== undefined || v['run-dir'] !== undefined || v['guest-agent'] !== undefined) throw new MobilityError('MOB_ERR_USAGE', '--node, --run-dir and --guest-agent go with --qmp (host mode)');
        checks = await runPreflight({ serverUrl: v.server as string | undefined, stateDir, disks: v.disk as string[] | undefined });
      }
      const ok = checks.every((c) => c.ok);
      out(v, { ok, checks }, () => formatPreflight(checks) + (ok ? 'preflight: all checks passed\n' : 'preflight: FAILED\n'));
      if (!ok && !v.json) {
        const first = checks.find((c) => !c.ok)!;
        process.stderr.write(`MOBILITY-PREFLIGHT fail ${first.code ?? 'MOB_ERR_PREFLIGHT'} ${first.message}\n`);
      }
      return ok ? EXIT.OK : EXIT.CONFIG;
    }
    case 'machines': {
      const { values: v } = parse(argv, CONN);
      if (v.help) { process.stdout.write(HELP.machines); return EXIT.OK; }
      const j = await api(await serverConn(v), 'GET', '/v1/machines');
      const { formatMachines } = await import('../agent/inventory.js');
      type M = {
        agentId: string; hostname: string; connected: boolean; lastSeen: string | null; inventory: import('../agent/inventory.js').Inventory | null; policy: string; disks: { diskId: string; device: string }[];
        /** Absent from servers before profile-only mode. */
        profiled?: { diskId: string; device: string }[];
        /** A host agent's VMs (absent for other machines and from older servers). */
        vms?: MachineVmRow[];
      };
      const ms = (j.machines ?? []) as M[];
      out(v, j, () => ms.length === 0 ? 'no registered machines\n' : formatMachines(ms.map((m) => ({ ...m, disks: m.disks.length })))
        + ms.filter((m) => m.vms !== undefined).map((m) => formatHostVms(m.agentId, m.vms!)).join('')
        + ms.filter((m) => m.disks.length).map((m) => `${m.agentId} protects ${m.disks.map((d) => `${d.diskId} (${d.device})`).join(', ')}\n`).join('')
        + ms.filter((m) => m.profiled?.length).map((m) => `${m.agentId} profiles ${m.profiled!.map((d) => `${d.diskId} (${d.device})`).join(', ')} (capacity planning: see mobility capacity)\n`).join(''));
      return EXIT.OK;
    }
    case 'policy': {
      const [sub, ...rest] = argv;
      const { values: v, positionals } = parse(rest, {
        ...CONN, rpo: { type: 'string' }, retention: { type: 'string' }, 'crash-interval': { type: 'string' }, 'app-interval': { type: 'string' },
        'no-compress': { type: 'boolean' }, compress: { type: 'string' }, 'max-rate': { type: 'string' }, machine: { type: 'string' }, policy: { type: 'string' },
        'freeze-limit': { type: 'string' }, 'spool-budget': { type: 'string' },
      }, true);
      if (v.help || !['create', 'list', 'assign'].includes(sub)) { process.stdout.write(HELP.policy); return v.help ? EXIT.OK : EXIT.USAGE; }
      const c = await serverConn(v);
      type P = { name: string; rpoThresholdMs: number; retentionMs: number; crashIntervalMs: number; appIntervalMs: number; compress: boolean; compressMode?: string; bandwidthBytes: number; freezeLimitMs?: number; spoolBudgetBytes?: number };
      const fmt = (ps: P[]) => table([['POLICY', 'RPO ALERT', 'RETENTION', 'CRASH', 'APP', 'COMPRESS', 'MAX RATE', 'FREEZE LIMIT', 'SPOOL'],
        ...ps.map((p) => [p.name, fmtAge(p.rpoThresholdMs), fmtAge(p.retentionMs), fmtAge(p.crashIntervalMs), p.appIntervalMs ? fmtAge(p.appIntervalMs) : 'off', p.compressMode ?? (p.compress ? 'auto' : 'never'), p.bandwidthBytes ? `${fmtBytes(p.bandwidthBytes)}/s` : 'unlimited',
          // an older server sends neither
          p.freezeLimitMs === undefined ? '-' : fmtAge(p.freezeLimitMs), p.spoolBudgetBytes === undefined ? '-' : fmtBytes(p.spoolBudgetBytes)])]);
      if (sub === 'list') {
        const j = await api(c, 'GET', '/v1/policies');
        out(v, j, () => fmt(j.policies as P[]));
      } else if (sub === 'create') {
        const name = positionals[0];
        if (!name) throw new MobilityError('MOB_ERR_USAGE', 'policy create needs a NAME');
        const mode = compressMode(v, undefined);
        const j = await api(c, 'POST', '/v1/policies', {
          name, rpoThresholdMs: durOpt(v, 'rpo'), retentionMs: durOpt(v, 'retention'), crashIntervalMs: durOpt(v, 'crash-interval'), appIntervalMs: durOpt(v, 'app-interval'),
          // auto and never as the boolean every server understands; always only as a mode
          compress: mode === undefined ? undefined : mode === 'always' ? mode : mode === 'auto',
          compressMode: mode, bandwidthBytes: v['max-rate'] ? parseSize(v['max-rate'] as string) : undefined,
          freezeLimitMs: durOpt(v, 'freeze-limit'), spoolBudgetBytes: v['spool-budget'] ? parseSize(v['spool-budget'] as string) : undefined,
        });
        const saved = j.policy as P;
        if (mode === 'always' && saved.compressMode !== 'always') {
          throw new MobilityError('MOB_ERR_CONFIG', `policy ${saved.name} was saved, but with compression ${saved.compressMode ?? (saved.compress ? 'on' : 'off')}: the server predates --compress always (upgrade it, then run this again)`);
        }
        out(v, j, () => fmt([saved]));
      } else {
        if (!v.machine || !v.policy) throw new MobilityError('MOB_ERR_USAGE', 'policy assign needs --machine and --policy');
        const j = await api(c, 'POST', '/v1/policies/assign', { machine: v.machine, policy: v.policy });
        out(v, j, () => `machine ${String(j.agentId)} now replicates under policy ${(j.policy as P).name}${j.pushed ? '' : ' (the agent is offline; it gets the policy when it connects)'}\n`);
      }
      return EXIT.OK;
    }
    case 'enable': case 'disable': {
      const { values: v } = parse(argv, {
        ...CONN, machine: { type: 'string' }, disk: { type: 'string' }, 'disk-id': { type: 'string' }, policy: { type: 'string' }, 'keep-replica': { type: 'boolean' },
        ...(cmd === 'disable' ? { yes: { type: 'boolean', short: 'y' } } : { 'profile-only': { type: 'boolean' }, vm: { type: 'string' } }),
      });
      if (v.help) { process.stdout.write(HELP[cmd]); return EXIT.OK; }
      if (cmd === 'enable' && typeof v.vm === 'string') {
        if (!v.machine) throw new MobilityError('MOB_ERR_USAGE', 'enable --vm needs --machine HOST (the host agent)');
        if (v.disk || v['disk-id'] || v['profile-only']) throw new MobilityError('MOB_ERR_USAGE', 'enable --vm protects every disk of the VM: it takes no --disk, --disk-id or --profile-only');
        const j = await api(await serverConn(v), 'POST', '/v1/enable', { machine: v.machine, vm: v.vm, policy: v.policy });
        const disks = (j.disks ?? []) as { diskId: string; node: string; format: string; sizeBytes: number }[];
        out(v, j, () => `enabled VM ${String(j.vm)} of ${String(j.hostId)} as machine ${String(j.agentId)} under policy ${String(j.policy)}: `
          + `${disks.map((d) => `${d.diskId} (node ${d.node}, ${d.format}, ${(d.sizeBytes / 1024 ** 3).toFixed(1)} GiB)`).join(', ')}; `
          + `${(j.preflight as unknown[] | undefined)?.length ? 'preflight passed; ' : ''}initial replication starts now (mobility status shows progress)\n`);
        return EXIT.OK;
      }
      if (!v.machine || !v.disk) throw new MobilityError('MOB_ERR_USAGE', `${cmd} needs --machine and --disk`);
      const c = await serverConn(v);
      if (cmd === 'enable') {
        if (v['profile-only'] && v.policy) throw new MobilityError('MOB_ERR_USAGE', '--profile-only takes no --policy: nothing is replicated');
        const j = await api(c, 'POST', '/v1/enable', { machine: v.machine, disk: v.disk, diskId: v['disk-id'], policy: v.policy, ...(v['profile-only'] ? { profileOnly: true } : {}) });
        if (j.profileOnly === true) {
          out(v, j, () => `profiling ${String(j.diskId)} (${String(j.device)}) on ${String(j.agentId)}; preflight passed; nothing is replicated (mobility capacity plans from what it measures)\n`);
          return EXIT.OK;
        }
        if (v['profile-only']) throw new MobilityError('MOB_ERR_CONFIG', `the server does not know profile-only mode (an older server) and enabled protection of ${String(j.diskId)} instead; if that is not wanted: mobility disable --machine ${String(j.agentId)} --disk ${String(j.diskId)}`);
        out(v, j, () => `enabled ${String(j.diskId)} (${String(j.device)}) on ${String(j.agentId)} under policy ${String(j.policy)}; preflight passed; initial replication starts now (mobility status shows progress)\n`);
      } else {
        const body = { machine: v.machine, disk: v.disk, keepReplica: Boolean(v['keep-replica']) };
        if (!body.keepReplica) {
          const dry = await api(c, 'POST', '/v1/disable', { ...body, dryRun: true });
          // a profiled disk: nothing on the server to delete, nothing to ask
          if (dry.profileOnly !== true) await confirmDestructive({
            yes: Boolean(v.yes), command: 'disable',
            summary: `disable ${String(dry.diskId)} (${String(dry.device)}) on ${String(dry.agentId)} deletes, on the server:\n${fmtDisablePlan(dry.plan as DisablePlan)}`,
          });
        }
        const j = await api(c, 'POST', '/v1/disable', body);
        const removed = j.removed as DisablePlan | null;
        if (j.profileOnly === true) {
          out(v, j, () => `profiling of ${String(j.diskId)} on ${String(j.agentId)} ended; its churn samples stay for mobility capacity\n`);
          return EXIT.OK;
        }
        out(v, j, () => `disabled ${String(j.diskId)} on ${String(j.agentId)}${removed ? '; deleted:\n' + fmtDisablePlan(removed) : '; replica, recovery points and test-failover images kept\n'}`);
      }
      return EXIT.OK;
    }
    case 'cut': {
      const { values: v } = parse(argv, { ...CONN, machine: { type: 'string' }, kind: { type: 'string' }, timeout: { type: 'string' } });
      if (v.help) { process.stdout.write(HELP.cut); return EXIT.OK; }
      if (!v.machine) throw new MobilityError('MOB_ERR_USAGE', 'cut needs --machine');
      const kind = (v.kind as string | undefined) ?? 'crash';
      if (kind !== 'crash' && kind !== 'app') throw new MobilityError('MOB_ERR_USAGE', `--kind must be crash or app, not ${kind}`);
      const timeoutMs = durOpt(v, 'timeout') ?? 120_000;
      if (timeoutMs < 1000 || timeoutMs > 3_600_000) throw new MobilityError('MOB_ERR_USAGE', '--timeout must be between 1s and 1h');
      const j = await api(await serverConn(v), 'POST', '/v1/cut', { machine: v.machine, kind, timeoutMs });
      const p = j.point as { id: string; kind: string; takenAt: string; frozenMs: number; note: string };
      if (v.json) {
        process.stdout.write(JSON.stringify(j, null, 2) + '\n');
      } else {
        process.stdout.write(`${p.id}\n`);
        process.stderr.write(`recovery point ${p.id} of ${String(j.agentId)}: ${p.kind}-consistent, frozen at ${p.takenAt} for ${p.frozenMs} ms${p.note ? ` (${p.note})` : ''}; waited ${fmtAge(Number(j.waitedMs))}\n`);
      }
      return EXIT.OK;
    }
    case 'group': {
      const [sub, ...rest] = argv;
      const { values: v, positionals } = parse(rest, {
        ...CONN, machine: { type: 'string', multiple: true }, interval: { type: 'string' }, bound: { type: 'string' }, kind: { type: 'string' },
      }, true);
      if (v.help || !['create', 'list', 'delete', 'cut'].includes(sub)) { process.stdout.write(HELP.group); return v.help ? EXIT.OK : EXIT.USAGE; }
      const kind = v.kind as string | undefined;
      if (kind !== undefined && kind !== 'crash' && kind !== 'app') throw new MobilityError('MOB_ERR_USAGE', `--kind must be crash or app, not ${kind}`);
      const name = positionals[0];
      if (sub !== 'list' && !name) throw new MobilityError('MOB_ERR_USAGE', `group ${sub} needs a NAME`);
      const c = await serverConn(v);
      type G = { name: string; members: string[]; intervalMs: number; boundMs: number; kind: string; running?: boolean; machines?: { agentId: string; connected: boolean; disks: string[] }[] };
      const fmt = (gs: G[]) => table([['GROUP', 'MACHINES', 'INTERVAL', 'BOUND', 'KIND', 'STATE'], ...gs.map((g) => [
        g.name, (g.machines ?? g.members.map((agentId) => ({ agentId, connected: true, disks: [] }))).map((m) => `${m.agentId}${m.connected ? '' : ' (offline)'}`).join(', '),
        g.intervalMs ? fmtAge(g.intervalMs) : 'on demand', fmtAge(g.boundMs), g.kind, g.running ? 'cutting' : 'idle',
      ])]);
      if (sub === 'list') {
        const j = await api(c, 'GET', '/v1/groups');
        const gs = j.groups as G[];
        out(v, j, () => gs.length ? fmt(gs) : 'no consistency groups\n');
      } else if (sub === 'create') {
        const machines = (v.machine as string[] | undefined) ?? [];
        if (!machines.length) throw new MobilityError('MOB_ERR_USAGE', 'group create needs at least one --machine');
        const interval = v.interval === 'off' ? 0 : durOpt(v, 'interval');
        const j = await api(c, 'POST', '/v1/groups', { name, members: machines, intervalMs: interval, boundMs: durOpt(v, 'bound'), kind });
        out(v, j, () => fmt([j.group as G]));
      } else if (sub === 'delete') {
        const j = await api(c, 'POST', '/v1/groups/delete', { name });
        out(v, j, () => `group ${name} removed (its machines and points are unchanged)\n`);
      } else {
        const j = await api(c, 'POST', '/v1/groups/cut', { group: name, kind });
        const r = j as unknown as import('../server/group-cut.js').GroupPointOutcome;
        if (v.json) {
          process.stdout.write(JSON.stringify(j, null, 2) + '\n');
        } else {
          process.stdout.write(`${r.point}\n`);
          process.stderr.write(`group point ${r.point} of ${r.group} (${r.kind}): ${r.members.map((m) => `${m.agentId} ${m.pointId} (frozen ${m.frozenMs} ms)`).join(', ')}; `
            + `converged in ${fmtAge(r.convergeMs)}, freeze step ${r.freezeStepMs} ms\n`);
        }
      }
      return EXIT.OK;
    }
    case 'login': {
      const { values: v } = parse(argv, { ...CONN, list: { type: 'boolean' } });
      if (v.help) { process.stdout.write(HELP.login); return EXIT.OK; }
      if (v.list) return listProfiles(v);
      const { name } = selectProfile(v);
      if (v['data-dir'] === undefined && v['token-file'] === undefined) {
        throw new MobilityError('MOB_ERR_USAGE', 'login needs the credential to save: --token-file F (a copy of the server\'s DATA-DIR/token) with --ca F or --pin SHA256, or --data-dir DIR on the server');
      }
      // the options alone (not a profile), checked by an authenticated request: a refused token,
      // CA or pin throws its coded error here, before anything is written
      const c = await resolveConn(v, true);
      const j = await api(c, 'GET', '/v1/status');
      const { normalizeFingerprint } = await import('../transport/tls.js');
      const saved = { name, server: `${c.url.protocol}//${c.url.host}`, token: c.token, ca: c.ca, pin: c.pin === undefined ? undefined : normalizeFingerprint(c.pin), savedAt: new Date().toISOString() };
      const file = await saveProfile(saved);
      const trust = trustOf(saved);
      const inUse = defaultProfileName() === name;
      const disks = Array.isArray(j.disks) ? j.disks.length : 0;
      out(v, { profile: name, file, server: saved.server, ca: trust.ca ?? null, pin: trust.pin ?? null, savedAt: saved.savedAt, usedByDefault: inUse }, () =>
        `logged in to ${saved.server} (${trust.text}; the server reports ${disks} protected disk(s))\n`
        + `saved as profile ${name} in ${file}\n`
        + (inUse ? 'operator commands given no connection options use it now\n' : `use it with --profile ${name} (or MOBILITY_PROFILE=${name})\n`));
      return EXIT.OK;
    }
    case 'logout': {
      const { values: v } = parse(argv, { profile: { type: 'string' } });
      if (v.help) { process.stdout.write(HELP.logout); return EXIT.OK; }
      const { name, from } = selectProfile(v);
      if (!(await removeProfile(name))) {
        throw new MobilityError('MOB_ERR_CONFIG', `no profile '${name}'${from === 'default' ? '' : ` (named by ${from})`} at ${profileFile(name)}; mobility profiles lists the saved ones`);
      }
      process.stdout.write(`removed profile ${name} (${profileFile(name)})\n`);
      return EXIT.OK;
    }
    case 'profiles': {
      const { values: v } = parse(argv, { json: { type: 'boolean' } });
      if (v.help) { process.stdout.write(HELP.profiles); return EXIT.OK; }
      return listProfiles(v);
    }
    case 'push-account': {
      const [sub, ...rest] = argv;
      const { values: v } = parse(rest, { 'data-dir': { type: 'string' }, name: { type: 'string' }, user: { type: 'string' }, key: { type: 'string' }, 'password-file': { type: 'string' }, json: { type: 'boolean' } });
      if (v.help || !['add', 'list', 'remove'].includes(sub)) { process.stdout.write(HELP['push-account']); return v.help ? EXIT.OK : EXIT.USAGE; }
      const { ConfigDb } = await import('../server/config-db.js');
      const db = ConfigDb.open(dataDir(v));
      try {
        if (sub === 'list') {
          const rows = db.listPushAccounts();
          out(v, rows, () => rows.length ? table([['NAME', 'USER', 'KIND', 'CREATED'], ...rows.map((r) => [r.name, r.user, r.kind, r.createdAt])]) : 'no push accounts\n');
        } else if (sub === 'remove') {
          if (!v.name) throw new MobilityError('MOB_ERR_USAGE', '--name is required');
          if (!db.removePushAccount(v.name as string)) throw new MobilityError('MOB_ERR_CONFIG', `no push account named ${String(v.name)}`);
          process.stdout.write(`removed push account ${String(v.name)}\n`);
        } else {
          if (!v.name || !v.user) throw new MobilityError('MOB_ERR_USAGE', '--name and --user are required');
          if (Boolean(v.key) === Boolean(v['password-file'])) throw new MobilityError('MOB_ERR_USAGE', 'give exactly one of --key and --password-file');
          const secret = v.key ? await readSecretFile(v.key as string, 'key') : await readSecretFile(v['password-file'] as string, 'password-file');
          db.putPushAccount({ name: v.name as string, user: v.user as string, kind: v.key ? 'key' : 'password', secret: v.key ? secret + '\n' : secret });
          process.stdout.write(`stored push account ${String(v.name)} (${v.key ? 'key' : 'password'}, encrypted at rest)\n`);
        }
      } finally {
        db.close();
      }
      return EXIT.OK;
    }
    case 'push-install': {
      const { values: v } = parse(argv, {
        ...CONN, host: { type: 'string', multiple: true }, 'hosts-file': { type: 'string' }, port: { type: 'string' }, user: { type: 'string' }, key: { type: 'string' },
        'password-file': { type: 'string' }, account: { type: 'string' }, 'host-key': { type: 'string' }, bundle: { type: 'string' }, prefix: { type: 'string' },
        parallel: { type: 'string' }, timeout: { type: 'string' },
      });
      if (v.help) { process.stdout.write(HELP['push-install']); return EXIT.OK; }
      const { pushInstall } = await import('./push-cli.js');
      return pushInstall(v, await serverConn(v), dataDir(v));
    }
    default:
      throw new MobilityError('MOB_ERR_USAGE', `unknown command ${cmd}`);
  }
}

/** The profile commands use when given no connection options ($MOBILITY_PROFILE, else 'default'); undefined when that name is invalid. */
function defaultProfileName(): string | undefined {
  try { return selectProfile({}).name; } catch { return undefined; }
}

/** mobility profiles (and login --list): the saved profiles, never their tokens. */
async function listProfiles(v: Values): Promise<number> {
  const used = defaultProfileName();
  const rows: { name: string; server: string | null; ca: string | null; pin: string | null; trust: string; savedAt: string | null; usedByDefault: boolean; error?: { code: string; message: string } }[] = [];
  for (const name of await profileNames()) {
    try {
      const p = await readProfile(name);
      if (!p) continue; // removed meanwhile
      const t = trustOf(p);
      rows.push({ name, server: p.server, ca: t.ca ?? null, pin: t.pin ?? null, trust: t.text, savedAt: p.savedAt || null, usedByDefault: name === used });
    } catch (err) {
      if (!(err instanceof MobilityError)) throw err;
      rows.push({ name, server: null, ca: null, pin: null, trust: 'unusable', savedAt: null, usedByDefault: name === used, error: { code: err.code, message: err.message } });
    }
  }
  if (v.json) {
    process.stdout.write(JSON.stringify({ configDir: configDir(), profiles: rows.map(({ trust: _t, ...r }) => r) }, null, 2) + '\n');
  } else if (!rows.length) {
    process.stdout.write(`no profiles in ${configDir()}: save one with mobility login --server URL --token-file F (--ca F | --pin SHA256)\n`);
  } else {
    process.stdout.write(table([['NAME', 'SERVER', 'TRUST', 'SAVED AT'], ...rows.map((r) => [`${r.name}${r.usedByDefault ? ' *' : ''}`, r.server ?? '-', r.trust, r.savedAt ?? '-'])])
      + (rows.some((r) => r.usedByDefault) ? `* used by commands given no connection options (${process.env.MOBILITY_PROFILE ? 'MOBILITY_PROFILE' : 'the default profile'})\n` : ''));
  }
  for (const r of rows) if (r.error) process.stderr.write(`mobility: profile ${r.name}: ${r.error.code}: ${r.error.message}\n`);
  return EXIT.OK;
}
