// A counting SMTP server for benchmarks: Nodemailer's smtp-server, STARTTLS and AUTH required.
// Same interface as smtp_sink.py: prints "ready" when listening and the number of messages
// received when stopped (SIGTERM/SIGINT).
//
//   node bench/smtp_sink.mjs --port N --cert cert.pem --key key.pem --user U --password P
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { SMTPServer } from 'smtp-server';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    cert: { type: 'string' },
    key: { type: 'string' },
    user: { type: 'string' },
    password: { type: 'string' },
  },
});

let count = 0;
const server = new SMTPServer({
  secure: false, // plain connection, upgraded with STARTTLS
  key: readFileSync(args.key),
  cert: readFileSync(args.cert),
  authMethods: ['PLAIN', 'LOGIN'],
  authOptional: false, // MAIL needs AUTH ...
  allowInsecureAuth: false, // ... and AUTH needs TLS: STARTTLS is required
  disableReverseLookup: true,
  logger: false,
  onAuth(auth, session, callback) {
    if (auth.username === args.user && auth.password === args.password) {
      return callback(null, { user: auth.username });
    }
    return callback(new Error('Invalid username or password'));
  },
  onData(stream, session, callback) {
    stream.on('data', () => {});
    stream.on('end', () => {
      count += 1;
      callback(null, 'OK');
    });
  },
});

server.listen(Number(args.port), '127.0.0.1', () => console.log('ready'));
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    console.log(String(count));
    process.exit(0);
  });
}
