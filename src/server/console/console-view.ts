/**
 * What the console needs from the server: a narrow slice of the server context (database,
 * catalogs, the store's images, the control hub) plus the two operations it reuses from the
 * JSON API, handed in by the composition root so the console never imports the API module.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { ServerContext } from '../context.js';
import type { DiskStatus } from '../disk-status.js';

export type ConsoleServerView = Pick<ServerContext, 'db' | 'log' | 'catalog' | 'backend' | 'failoverState' | 'control' | 'identity'>;

export interface ConsoleDeps {
  server: ConsoleServerView;
  /** Every disk's status, as GET /v1/status answers it. */
  status(): Promise<DiskStatus[]>;
  /**
   * The JSON operator API (api.ts) for a request the console has already authenticated: the
   * same routes, validation and functions as with the bearer token. req.url is a /v1/ path.
   */
  operatorApi(req: IncomingMessage, res: ServerResponse): Promise<void>;
}

export type { OperatorConsole } from './operator-console.js';
