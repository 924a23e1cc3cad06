/** Defaults and bounds, in one place. Every buffer has a bound here. */
/** 2: cuts carry sampled page digests (evidence) and CutAck can refuse a point. */
export const PROTOCOL_VERSION = 2;
export const AGENT_VERSION = '0.2.0';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** Transfer unit: a block is read, digested and compressed as one. */
export const DEFAULT_BLOCK_SIZE = 64 * KiB;
/** Delta unit: the source remembers one digest per page, and sends only changed pages of a block. */
export const PAGE_SIZE = 4 * KiB;
export const MIN_BLOCK_SIZE = 4 * KiB;
export const MAX_BLOCK_SIZE = 1 * MiB;

/** Source reads this much at a time (coalesced sequential reads). */
export const READ_CHUNK_BYTES = 4 * MiB;
/** A data frame is flushed when its payload reaches this size. */
export const TARGET_FRAME_PAYLOAD = 1 * MiB;
/** Largest binary message accepted (header + payload), with a coded error above it. */
export const MAX_FRAME_BYTES = 8 * MiB;
/** Largest protobuf header inside a message. */
export const MAX_HEADER_BYTES = 256 * KiB;
/** Hard ceiling handed to ws: above it ws closes with 1009 before buffering. */
export const WS_MAX_PAYLOAD = 2 * MAX_FRAME_BYTES;
/** Bytes waiting in the agent's socket beyond the kernel's buffer from which the link counts as the bottleneck (compress auto). */
export const LINK_BACKLOG_BYTES = 2 * MiB;
/** Data the agent lets wait for its socket (beyond the kernel's buffers) before it sends more: bounds how long a control frame queues behind data. Above LINK_BACKLOG_BYTES, so a slow link still shows. */
export const SEND_QUEUE_BYTES = 4 * MiB;
/** Server load (Ack busy_pct: event-loop utilization or host CPU, percent) from which a socket backlog counts as the server's, not the link's. */
export const PEER_BUSY_PCT = 50;
/** Credit window the server grants: bounds bytes in flight and buffered on both sides. */
export const CREDIT_WINDOW_BYTES = 32 * MiB;

export const HEARTBEAT_MS = 5000;
export const HEARTBEAT_MAX_MISSED = 3;

/** Pages per DigestRequest, and how many requests the agent keeps outstanding. */
export const DIGEST_REQUEST_PAGES = 1024;
export const DIGEST_REQUESTS_IN_FLIGHT = 8;

/** The replica store checkpoints (syncs replica, empties the WAL) past this WAL size. */
export const WAL_CHECKPOINT_BYTES = 256 * MiB;
/** The agent persists its digest map at most this often while a pass runs. */
export const DIGEST_MAP_PERSIST_MS = 1000;

export const RECONNECT_MIN_MS = 250;
export const RECONNECT_MAX_MS = 10_000;
export const DEFAULT_RETRY_DEADLINE_MS = 120_000;

export const DEFAULT_PORT = 7443;
/** Agent, disk and policy ids: path components, so "." and ".." are refused. */
export const ID_PATTERN = /^(?!\.{1,2}$)[A-Za-z0-9._-]{1,64}$/;
