// node validate_speedscope.js NPM_DIR FILE: validates FILE against the
// file-format schema that the speedscope npm package ships, with ajv.
// Prints ajv's errors as JSON ([] when valid); exit status 1 if invalid.
"use strict";
const fs = require("fs");
const path = require("path");

const [npm, file] = process.argv.slice(2);
const modules = path.join(npm, "node_modules");
const Ajv = require(path.join(modules, "ajv"));
const schema = require(path.join(modules, "speedscope", "dist", "release",
                                 "file-format-schema.json"));
const validate = new Ajv({ allErrors: true }).compile(schema);
const valid = validate(JSON.parse(fs.readFileSync(file, "utf8")));
console.log(JSON.stringify(validate.errors || []));
process.exit(valid ? 0 : 1);
