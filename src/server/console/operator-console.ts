/**
 * The operator console as the HTTP listener and the server context see it (its own module: the
 * context names it, and the console's other modules import the context).
 */
import type { IncomingMessage, ServerResponse } from 'node:http';

export interface OperatorConsole {
  /** Answers a request under /console (or / itself). Never throws. */
  handle(req: IncomingMessage, res: ServerResponse, url: URL): Promise<void>;
  /** Ends the live streams (server stop): open event streams would keep the listener from closing. */
  close(): void;
}
