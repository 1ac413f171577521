#!/usr/bin/env node
// A splitfed client in Node.js: checks a backbone's health (grpc.health.v1) and reads its
// model info (splitfed.v1.Backbone/GetModelInfo) over mutual TLS, with the protos loaded
// at run time from the repository's protos/ directory. See docs/other-languages.md.
//
//   node examples/node/client.js --address HOST:PORT --tls-dir DIR \
//       [--server-name backbone.splitfed.local] [--protos DIR] [--timeout SECONDS]
//
// DIR is what `splitfed keys enroll --out DIR` wrote: ca.pem (the deployment CA),
// cert.pem and key.pem (this party's certificate and PKCS#8 key).
//
// Prints one JSON object on standard output. On a failed call it prints
// "STATUS_NAME: details (method)" on standard error and exits 1; usage errors exit 2.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { protoPath: HEALTH_PROTO } = require('grpc-health-check');

// splitfed's default chunk (4 MiB) plus the 64 KiB its servers allow for headers and the
// other fields of a frame. GetModelInfo is small; streams of tensors need this much.
const MAX_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024;

const LOADER_OPTIONS = {
  keepCase: true, // field names as in the .proto files (num_layers, not numLayers)
  longs: String, // 64-bit integers as strings: a JavaScript number loses bits above 2^53
  enums: String, // enum values by name ("DTYPE_FLOAT32")
  defaults: true, // zero values too (encryption: false)
  oneofs: true,
};

const USAGE =
  'usage: node client.js --address HOST:PORT --tls-dir DIR ' +
  '[--server-name NAME] [--protos DIR] [--timeout SECONDS] [--no-client-cert]';

class UsageError extends Error {}

function parseCommandLine(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        address: { type: 'string' },
        'tls-dir': { type: 'string' },
        'server-name': { type: 'string', default: 'backbone.splitfed.local' },
        protos: { type: 'string', default: path.resolve(__dirname, '..', '..', 'protos') },
        timeout: { type: 'string', default: '10' },
        // Connect without a client certificate, to check that the server refuses it.
        'no-client-cert': { type: 'boolean', default: false },
        help: { type: 'boolean', default: false },
      },
    }));
  } catch (err) {
    throw new UsageError(err.message);
  }
  if (values.help) {
    process.stdout.write(USAGE + '\n');
    process.exit(0);
  }
  if (!values.address) throw new UsageError('--address is required');
  if (!values['tls-dir']) throw new UsageError('--tls-dir is required');
  const timeout = Number(values.timeout);
  if (!(timeout > 0)) throw new UsageError(`--timeout must be a positive number of seconds`);
  return {
    address: values.address,
    tlsDir: values['tls-dir'],
    serverName: values['server-name'],
    protos: values.protos,
    timeoutMs: timeout * 1000,
    clientCert: !values['no-client-cert'],
  };
}

function readPem(directory, name) {
  const file = path.join(directory, name);
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new UsageError(`cannot read ${file}: ${err.code || err.message}`);
  }
}

// Mutual TLS from an enrolled directory. The server's certificate names it by its
// service name (backbone.splitfed.local), not by the address dialled, so the channel
// checks the certificate against serverName.
function credentials(tlsDir, clientCert) {
  const ca = readPem(tlsDir, 'ca.pem');
  if (!clientCert) return grpc.credentials.createSsl(ca);
  return grpc.credentials.createSsl(ca, readPem(tlsDir, 'key.pem'), readPem(tlsDir, 'cert.pem'));
}

function loadServices(protosDir) {
  const backboneProto = path.join(protosDir, 'splitfed', 'v1', 'backbone.proto');
  if (!fs.existsSync(backboneProto)) {
    throw new UsageError(`${backboneProto} not found; point --protos at the repository's protos/`);
  }
  const splitfed = grpc.loadPackageDefinition(
    protoLoader.loadSync('splitfed/v1/backbone.proto', {
      ...LOADER_OPTIONS,
      includeDirs: [protosDir],
    }),
  );
  const health = grpc.loadPackageDefinition(protoLoader.loadSync(HEALTH_PROTO, LOADER_OPTIONS));
  return { Backbone: splitfed.splitfed.v1.Backbone, Health: health.grpc.health.v1.Health };
}

// One unary call as a promise; a failure carries the method's name.
function call(client, method, fullName, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + timeoutMs }, (err, response) => {
      if (err) {
        err.method = fullName;
        reject(err);
      } else {
        resolve(response);
      }
    });
  });
}

async function main(argv) {
  const args = parseCommandLine(argv);
  const { Backbone, Health } = loadServices(args.protos);
  const creds = credentials(args.tlsDir, args.clientCert);
  const options = {
    'grpc.ssl_target_name_override': args.serverName,
    'grpc.default_authority': args.serverName,
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  };
  // Clients with the same target, credentials and options share one connection.
  const health = new Health(args.address, creds, options);
  const backbone = new Backbone(args.address, creds, options);
  try {
    const service = 'splitfed.v1.Backbone';
    const checked = await call(
      health,
      'Check',
      'grpc.health.v1.Health/Check',
      { service },
      args.timeoutMs,
    );
    const response = await call(
      backbone,
      'GetModelInfo',
      'splitfed.v1.Backbone/GetModelInfo',
      {},
      args.timeoutMs,
    );
    const result = {
      address: args.address,
      server_name: args.serverName,
      health: { service, status: checked.status },
      model_info: response.info,
    };
    process.stdout.write(JSON.stringify(result, null, 2) + '\n');
    if (checked.status !== 'SERVING') {
      process.stderr.write(`${service} is ${checked.status}\n`);
      return 1;
    }
    return 0;
  } finally {
    health.close();
    backbone.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    if (err instanceof UsageError) {
      process.stderr.write(`${err.message}\n${USAGE}\n`);
      process.exitCode = 2;
    } else if (typeof err.code === 'number' && grpc.status[err.code] !== undefined) {
      // grpc.status maps numbers back to names: 14 -> "UNAVAILABLE".
      process.stderr.write(`${grpc.status[err.code]}: ${err.details} (${err.method})\n`);
      process.exitCode = 1;
    } else {
      process.stderr.write(`${err.stack || err}\n`);
      process.exitCode = 1;
    }
  },
);
