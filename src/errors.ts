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
  MOB_ERR_FREEZE: { retryable: true, summary: 'A filesystem could not be frozen, or the freeze exceeded its time bound (it was thawed; the cut is retried later).' },
  MOB_ERR_HOOK: { retryable: true, summary: 'An application-consistency hook script failed or timed out (the filesystems were thawed).' },
  MOB_ERR_FAILED_OVER: { retryable: false, summary: 'The agent was failed over: replication is stopped until reprotect fails it back.' },
  MOB_ERR_UNKNOWN_POINT: { retryable: false, summary: 'No such recovery point, or it is outside the retention window.' },
  MOB_ERR_CUT: { retryable: false, summary: 'A consistency cut frame is invalid (unknown disk, sequence ahead of the data, disks missing).' },
  MOB_ERR_INTERNAL: { retryable: true, summary: 'An unexpected internal error (a bug): the message says more.' },
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
