// One-shot MongoDB setup for docker-compose.yml (and deploy/MULTI_HOST.md), run with
//   mongosh --nodb --quiet /deploy/mongo-init.js
// Idempotent: initiates the replica set once, waits (bounded) for a primary, then creates or
// updates the application user. Credentials come from the environment, never the command line.
//
// Environment: MONGO_MEMBERS (host:port,... in member id order), MONGO_REPLICA_SET,
// MONGO_ROOT_USER / MONGO_ROOT_PASSWORD (created by the mongo image on mongo-0's first start),
// MONGO_APP_USER / MONGO_APP_PASSWORD / MONGODB_DATABASE (the user the workers connect as:
// readWrite on their database only). Each of them may instead name a file in NAME_FILE (a
// compose secret under /run/secrets), which wins: docker-compose.yml passes the passwords so.

const PRIMARY_WAIT_S_MAX = 120;
const NOT_YET_INITIALIZED = 94;

const SECRET_FILE_BYTES_MAX = 4096;

function fromFile(variable, path) {
  const fs = require("fs");
  let stat = null;
  try {
    stat = fs.statSync(path);
  } catch (error) {
    throw new Error(`mongo-init: ${variable} ${path} is missing (deploy/make-secrets.sh)`);
  }
  if (!stat.isFile() || stat.size > SECRET_FILE_BYTES_MAX) {
    throw new Error(`mongo-init: ${variable} ${path} is not a file of at most ` +
                    `${SECRET_FILE_BYTES_MAX} bytes`);
  }
  const value = fs.readFileSync(path, "utf8").trim();
  if (!value) {
    throw new Error(`mongo-init: ${variable} ${path} is empty (deploy/make-secrets.sh)`);
  }
  return value;
}

function required(name) {
  const file = process.env[`${name}_FILE`];
  if (file) {
    return fromFile(`${name}_FILE`, file);
  }
  const value = process.env[name];
  if (!value) {
    throw new Error(`mongo-init: ${name} (or ${name}_FILE) is required`);
  }
  return value;
}

const members = required("MONGO_MEMBERS").split(",");
const replicaSet = required("MONGO_REPLICA_SET");
const rootUser = required("MONGO_ROOT_USER");
const rootPassword = required("MONGO_ROOT_PASSWORD");
const appUser = required("MONGO_APP_USER");
const appPassword = required("MONGO_APP_PASSWORD");
const database = required("MONGODB_DATABASE");
if (members.length < 1 || members.length > 7) {
  throw new Error(`mongo-init: 1..7 voting members, got ${members.length}`);
}

function adminOf(hostPort) {
  const admin = new Mongo(`mongodb://${hostPort}/?directConnection=true`).getDB("admin");
  admin.auth(rootUser, rootPassword);
  return admin;
}

// The root user exists only on the first member until the set is initiated (the other
// members start empty and copy it by initial sync), so initiate through the first member.
const seed = adminOf(members[0]);
function replicaSetStatusCode() {
  // mongosh throws on a command error; an older shell returns {ok: 0, code}: accept both.
  try {
    const reply = seed.adminCommand({ replSetGetStatus: 1 });
    return reply.ok ? 0 : reply.code;
  } catch (error) {
    return error.code;
  }
}
const statusCode = replicaSetStatusCode();
if (statusCode !== 0 && statusCode !== NOT_YET_INITIALIZED) {
  throw new Error(`mongo-init: replSetGetStatus failed with code ${statusCode}`);
}
if (statusCode === NOT_YET_INITIALIZED) {
  const config = {
    _id: replicaSet,
    members: members.map((host, index) => ({ _id: index, host: host })),
  };
  seed.adminCommand({ replSetInitiate: config });
  print(`mongo-init: initiated replica set ${replicaSet} with ${members.join(", ")}`);
}

let primary = null;
for (let waited = 0; waited < PRIMARY_WAIT_S_MAX && !primary; waited += 1) {
  primary = seed.adminCommand({ hello: 1 }).primary || null;
  if (!primary) {
    sleep(1000);
  }
}
if (!primary) {
  throw new Error(`mongo-init: no primary elected after ${PRIMARY_WAIT_S_MAX} s`);
}

const admin = adminOf(primary);
const roles = [{ role: "readWrite", db: database }];
if (admin.getUser(appUser) === null) {
  admin.createUser({ user: appUser, pwd: appPassword, roles: roles },
                   { w: "majority", wtimeout: 30000 });
  print(`mongo-init: created user ${appUser} (readWrite on ${database})`);
} else {
  // Keeps the password and roles in step with the environment (a rotated password).
  admin.updateUser(appUser, { pwd: appPassword, roles: roles },
                   { w: "majority", wtimeout: 30000 });
  print(`mongo-init: updated user ${appUser} (readWrite on ${database})`);
}
print(`mongo-init: replica set ${replicaSet} ready, primary ${primary}`);
