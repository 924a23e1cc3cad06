/**
 * Every failure Mobility reports carries a stable code. Callers match on `code`,
 * never on message text. docs/errors.md documents each code; test/errors.test.ts
 * checks that the two lists agree.
 */
export const ERROR_CODES = {
  MOB_ERR_USAGE: { retryable: false, summary: 'Command-line usage is wrong.' },
  MOB_ERR_CONFIG: { retryable: false, summary: 'A configuration or input file is missing or invalid.' },
  MOB_ERR_AUTH: { retryable: false, summary: 'The credential (token) was refused.' },
  MOB_ERR_PROTOCOL_VERSION: { retryable: false, summary: 'The peer speaks a protocol version this side does not.' },
  MOB_ERR_HANDSHAKE: { retryable: false, summary: 'The first frame was not a Hello, or a Hello came twice, or the Hello is invalid.' },
  MOB_ERR_FRAME_MALFORMED: { retryable: false, summary: 'A frame could not be decoded (truncated, bad length prefix, bad protobuf, payload lengths disagree).' },
  MOB_ERR_FRAME_TOO_LARGE: { retryable: false, summary: 'A frame exceeded the maximum frame size.' },
  MOB_ERR_UNKNOWN_MESSAGE: { retryable: false, summary: 'A frame of a type this side does not handle here.' },
  MOB_ERR_DIGEST_MISMATCH: { retryable: true, summary: 'A block payload does not match its digest (corrupted in transit or at the source).' },
  MOB_ERR_REPLICA_DIVERGED: { retryable: true, summary: 'A partial block applied on top of the replica did not give the expected block: the replica is not what the source believes; a checksum resync follows.' },
  MOB_ERR_OUT_OF_RANGE: { retryable: false, summary: 'A write or digest request lies beyond the disk size.' },
  MOB_ERR_UNKNOWN_DISK: { retryable: false, summary: 'A frame names a disk that is not part of this session.' },
  MOB_ERR_BAD_DISK_ID: { retryable: false, summary: 'A disk or agent id has characters outside [A-Za-z0-9._-] or is too long.' },
  MOB_ERR_DISK_BUSY: { retryable: true, summary: 'Another session is replicating this disk.' },
  MOB_ERR_DISK_SIZE_CHANGED: { retryable: false, summary: 'The source disk is smaller than its replica (shrinking is not supported).' },
  MOB_ERR_SEQUENCE: { retryable: false, summary: 'A data frame sequence number did not increase.' },
  MOB_ERR_CREDIT_EXCEEDED: { retryable: false, summary: 'The agent sent more bytes than the server granted.' },
  MOB_ERR_HEARTBEAT_TIMEOUT: { retryable: true, summary: 'The peer stopped answering heartbeats.' },
  MOB_ERR_UNREACHABLE: { retryable: true, summary: 'The server could not be reached or the connection dropped.' },
  MOB_ERR_TLS_PIN: { retryable: false, summary: 'The server certificate does not match the pinned CA or fingerprint.' },
  MOB_ERR_STATE_CORRUPT: { retryable: false, summary: 'A persisted state file (digest map, replica state) is truncated or corrupt.' },
  MOB_ERR_SOURCE: { retryable: false, summary: 'The source disk cannot be opened or read.' },
  MOB_ERR_NO_SPACE: { retryable: true, summary: 'The replica store is out of space.' },
  MOB_ERR_STORAGE: { retryable: true, summary: 'The replica store failed to write or sync.' },
  MOB_ERR_SHUTTING_DOWN: { retryable: true, summary: 'The server is stopping.' },
  MOB_ERR_RETRY_EXHAUSTED: { retryable: false, summary: 'The agent gave up reconnecting after its retry deadline.' },
  MOB_ERR_TRACKER: { retryable: false, summary: 'The kernel change tracker (tracefs block events) cannot be set up or read.' },
  MOB_ERR_TRACKING_LOST: { retryable: false, summary: 'Change tracking lost events (ring buffer overrun, lost instance after a reboot, interrupted drain): the disk needs a checksum resync.' },
  MOB_ERR_AGENT_EXISTS: { retryable: false, summary: 'Another installation on this machine is registered under this agent identity and is connected; registering would stop its protection (use --replace to take over).' },
  MOB_ERR_TRACKER_BUSY: { retryable: false, summary: 'The trace instance is in use by a running agent: it cannot be used, disabled or removed by another process until that agent stops.' },
  MOB_ERR_POINT_UNVERIFIED: { retryable: true, summary: 'A cut\'s sampled verification failed: a sampled block of the replica differs from the source at the cut, so no recovery point was recorded and the disk is resynced.' },
  MOB_ERR_FREEZE: { retryable: true, summary: 'A filesystem could not be frozen, or the freeze exceeded its time bound (it was thawed; the cut is retried later).' },
  MOB_ERR_HOOK: { retryable: true, summary: 'An application-consistency hook script failed or timed out (the filesystems were thawed).' },
  MOB_ERR_FAILED_OVER: { retryable: false, summary: 'The agent was failed over: replication is stopped until reprotect fails it back.' },
  MOB_ERR_UNKNOWN_POINT: { retryable: false, summary: 'No such recovery point, or it is outside the retention window.' },
  MOB_ERR_CUT: { retryable: false, summary: 'A consistency cut frame is invalid (unknown disk, sequence ahead of the data, disks missing).' },
  MOB_ERR_PASSPHRASE: { retryable: false, summary: 'Registration refused: the passphrase (or one-time token) is wrong.' },
  MOB_ERR_TOKEN_USED: { retryable: false, summary: 'Registration refused: the one-time token was already used or has expired.' },
  MOB_ERR_RATE_LIMITED: { retryable: true, summary: 'Too many failed registration attempts (or console logins) from this address; wait and retry.' },
  MOB_ERR_SESSION: { retryable: false, summary: 'The operator console request has no valid session (not logged in, logged out, or the session expired).' },
  MOB_ERR_CSRF: { retryable: false, summary: 'A state-changing console request lacked the session\'s CSRF token or came from another origin: refused, nothing changed.' },
  MOB_ERR_CLONE: { retryable: false, summary: 'An agent presented another machine\'s identity (same agent id, different machine id): a cloned machine or copied agent state.' },
  MOB_ERR_NOT_REGISTERED: { retryable: false, summary: 'The agent is not registered (or its certificate was revoked): run `mobility register`.' },
  MOB_ERR_FORBIDDEN: { retryable: false, summary: 'An authenticated agent asked for something outside its own identity (another agent\'s disks).' },
  MOB_ERR_UNKNOWN_MACHINE: { retryable: false, summary: 'No registered machine has this id or hostname.' },
  MOB_ERR_UNKNOWN_VM: { retryable: false, summary: 'Host mode: the host\'s last inventory lists no VM of this name (or the machine is not a host agent, or the VM could not be inspected).' },
  MOB_ERR_UNKNOWN_POLICY: { retryable: false, summary: 'No replication policy has this name.' },
  MOB_ERR_AGENT_OFFLINE: { retryable: true, summary: 'The machine\'s agent is not connected to the server, so the request cannot reach it.' },
  MOB_ERR_NOT_PROTECTING: { retryable: false, summary: 'The machine protects nothing right now (no disk enabled, or its protection is not running), so there is nothing to cut.' },
  MOB_ERR_UNKNOWN_GROUP: { retryable: false, summary: 'No consistency group has this name.' },
  MOB_ERR_GROUP_TOO_LARGE: { retryable: false, summary: 'A consistency group may hold at most 16 machines.' },
  MOB_ERR_GROUP_CUT: { retryable: true, summary: 'A group cut was aborted (a machine did not answer within the bound, refused, failed or disconnected: the message names it) and every machine thawed, or a committed group cut did not become a point on every machine.' },
  MOB_ERR_GROUP_BUSY: { retryable: true, summary: 'A cut of this consistency group is already running; its outcome comes first.' },
  MOB_ERR_CUT_TIMEOUT: { retryable: true, summary: 'The requested cut did not become a recovery point within the wait (it stays queued on the agent).' },
  MOB_ERR_PREFLIGHT: { retryable: false, summary: 'One or more preflight checks failed; each failure carries its own MOB_ERR_PRE_* code.' },
  MOB_ERR_PRE_NOT_ROOT: { retryable: false, summary: 'Preflight: the agent must run as root (it reads block devices and tracefs).' },
  MOB_ERR_PRE_OS_UNSUPPORTED: { retryable: false, summary: 'Preflight: operating system, kernel or architecture not supported.' },
  MOB_ERR_PRE_NODE_VERSION: { retryable: false, summary: 'Preflight: Node.js 20 or newer is required and was not found.' },
  MOB_ERR_PRE_LOW_DISK: { retryable: false, summary: 'Preflight: not enough free space for the agent\'s program and state.' },
  MOB_ERR_PRE_NO_TRACEFS: { retryable: false, summary: 'Preflight: tracefs with block events is not available, so changes cannot be tracked.' },
  MOB_ERR_PRE_CLOCK_SKEW: { retryable: false, summary: 'Preflight: this machine\'s clock differs too much from the server\'s.' },
  MOB_ERR_PRE_UNREACHABLE: { retryable: true, summary: 'Preflight: the server\'s port cannot be reached from this machine.' },
  MOB_ERR_PRE_DISK_NOT_FOUND: { retryable: false, summary: 'Preflight: the disk does not exist or is not a block device.' },
  MOB_ERR_PRE_DISK_SIZE: { retryable: false, summary: 'Preflight: the disk is empty, not a multiple of 512 bytes, or above the supported size.' },
  MOB_ERR_PRE_QEMU: { retryable: false, summary: 'Preflight (host mode): QEMU cannot serve the tracker: its QMP socket does not answer, it is older than 6.0, it has no FUSE exports or /dev/fuse is missing, nbdinfo is missing, or a disk node is missing, not a format node, read-only or refuses a dirty bitmap.' },
  MOB_ERR_PRE_GUEST_AGENT: { retryable: false, summary: 'Preflight (host mode, app-consistent points): the VM\'s QEMU guest agent does not answer on its socket, or its fsfreeze commands are disabled.' },
  MOB_ERR_PUSH_UNREACHABLE: { retryable: true, summary: 'Push install (95101): the host\'s SSH (or WinRM) port cannot be reached.' },
  MOB_ERR_PUSH_AUTH: { retryable: false, summary: 'Push install (95102): the host refused the account\'s credentials.' },
  MOB_ERR_PUSH_HOST_KEY: { retryable: false, summary: 'Push install (95103): the host key does not match the pinned fingerprint.' },
  MOB_ERR_PUSH_NOT_ROOT: { retryable: false, summary: 'Push install (95104): the account is not root and cannot become root without a password.' },
  MOB_ERR_PUSH_OS_UNSUPPORTED: { retryable: false, summary: 'Push install (95105): the host\'s OS, architecture or Node.js is not supported.' },
  MOB_ERR_PUSH_LOW_DISK: { retryable: false, summary: 'Push install (95106): not enough free space on the host for the bundle and agent state.' },
  MOB_ERR_PUSH_INSTALL_FAILED: { retryable: false, summary: 'Push install (95107): the upload or the installer failed on the host; the message carries its output.' },
  MOB_ERR_PUSH_REG_TIMEOUT: { retryable: true, summary: 'Push install (95108): the agent was installed but did not register with the server in time.' },
  MOB_ERR_PUSH_NO_POWERSHELL: { retryable: false, summary: 'Push install (95109): the Windows path needs PowerShell (pwsh) on the server, and it is not installed.' },
  MOB_ERR_INTERNAL: { retryable: true, summary: 'An unexpected internal error (a bug): the message says more.' },
  MOB_ERR_TARGET_UNAVAILABLE: { retryable: true, summary: 'The replica target (Azure storage) did not answer or kept failing (HTTP 429/5xx, resets, timeouts) after retries; nothing unconfirmed was acknowledged, the agent keeps its changes and resumes when the target is back.' },
  MOB_ERR_TARGET_AUTH: { retryable: false, summary: 'The replica target refused the server\'s storage credentials (wrong key, expired SAS token, missing permission): fix the credentials file; nothing was written.' },
  MOB_ERR_TARGET_QUOTA: { retryable: true, summary: 'The replica target is out of capacity (account or container quota reached); nothing unconfirmed was acknowledged.' },
  MOB_ERR_QMP: { retryable: true, summary: 'Host mode: QEMU\'s QMP socket cannot be reached, closed, did not answer in time, or refused a command (the message carries QEMU\'s error class and text).' },
  MOB_ERR_GUEST_AGENT: { retryable: true, summary: 'Host mode: the VM\'s QEMU guest agent cannot be reached, did not answer in time, refused a command, or could not freeze or thaw the guest\'s filesystems (the message carries the agent\'s own answer).' },
  MOB_ERR_NBD: { retryable: true, summary: 'Host mode: reading a disk or its dirty bitmap over NBD failed (nbdinfo missing, failed or timed out, or printed something unexpected).' },
  MOB_ERR_HYPERV: { retryable: false, summary: 'Host mode on Hyper-V: a VM or disk cannot be tracked with Resilient Change Tracking (no such VM, a disk that is not VHDX, a VM configuration older than 6.2, PowerShell or the Hyper-V module missing, a WMI method that failed: the message says which).' },
  MOB_ERR_PLAN: { retryable: false, summary: 'Recovery plan: the plan is not valid (a step without machines, a machine in two steps or outside the plan\'s consistency group, a script path that is not absolute, a bad boot check), or the action does not fit it (cleanup without a test failover to clean up).' },
  MOB_ERR_UNKNOWN_PLAN: { retryable: false, summary: 'Recovery plan: no plan of that name on this server.' },
  MOB_ERR_QEMU_TRACKER: { retryable: false, summary: 'Host mode: a QEMU disk cannot be tracked (no such block node, its dirty bitmap is busy with another job, QEMU already runs an NBD server the tracker was not told about).' },
  MOB_ERR_DISK_TOO_LARGE: { retryable: false, summary: 'The disk is larger than the largest file the replica store\'s filesystem can hold; nothing was created.' },
  MOB_ERR_NETWORK_MAP: { retryable: false, summary: 'A network mapping is invalid (bad subnet, address or field), or it maps no NIC of the machine, or a mapped address does not fit its target subnet.' },
  MOB_ERR_IMAGE_MOUNT: { retryable: false, summary: 'A recovered image has no root filesystem that can be mounted (no partition or bare filesystem with /etc), so it cannot be changed before boot.' },
  MOB_ERR_GUEST_NETWORK: { retryable: false, summary: 'The recovered guest has no network stack Mobility can configure (netplan, systemd-networkd or ifupdown), or an interface it must name is unknown.' },
  MOB_ERR_BOOT_CHECK: { retryable: false, summary: 'A boot check could not run (QEMU missing or refused to start, no local image to boot); a guest that does not reach its marker is a failed result, not this error.' },
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

export class MobilityError extends Error {
  readonly code: ErrorCode;
  readonly retryable: boolean;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; retryable?: boolean }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'MobilityError';
    this.code = code;
    this.retryable = options?.retryable ?? ERROR_CODES[code].retryable;
  }
}

export function isErrorCode(code: string): code is ErrorCode {
  return Object.prototype.hasOwnProperty.call(ERROR_CODES, code);
}

/** Wraps anything thrown into a MobilityError, mapping common system errors. */
export function toMobilityError(err: unknown, fallback: ErrorCode = 'MOB_ERR_INTERNAL'): MobilityError {
  if (err instanceof MobilityError) return err;
  const e = err as NodeJS.ErrnoException | undefined;
  const msg = e?.message ?? String(err);
  switch (e?.code) {
    case 'ENOSPC':
    case 'EDQUOT':
      return new MobilityError('MOB_ERR_NO_SPACE', msg, { cause: err });
    case 'ECONNREFUSED':
    case 'ECONNRESET':
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
    case 'ETIMEDOUT':
    case 'EPIPE':
    case 'ENOTFOUND':
      return new MobilityError('MOB_ERR_UNREACHABLE', msg, { cause: err });
    case 'EIO':
      return new MobilityError('MOB_ERR_STORAGE', msg, { cause: err });
    default:
      return new MobilityError(fallback, msg, { cause: err });
  }
}
