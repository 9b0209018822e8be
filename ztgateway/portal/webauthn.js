// The browser side of the gateway's WebAuthn ceremonies (portal/webauthn.py): asks the
// gateway for options, hands them to navigator.credentials, posts the answer back as JSON.
// Served from /.ztgw/webauthn.js under a CSP that allows this origin's scripts only.
"use strict";
(function () {
  const root = document.getElementById("webauthn");
  if (!root) {
    return;
  }
  const status = document.getElementById("webauthn-status");
  const csrf = root.dataset.csrf;
  const rd = root.dataset.rd || "/";

  function fromB64url(text) {
    const b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "===".slice((b64.length + 3) % 4);
    return Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
  }
  function toB64url(buffer) {
    let text = "";
    new Uint8Array(buffer).forEach((b) => { text += String.fromCharCode(b); });
    return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }
  function say(text) {
    status.textContent = text;
  }
  async function post(url, body) {
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      body: JSON.stringify(body),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      throw new Error(data.title || data.detail || "Refused (" + response.status + ")");
    }
    return data;
  }
  function descriptors(list) {
    return (list || []).map((c) => Object.assign({}, c, { id: fromB64url(c.id) }));
  }

  // PublicKeyCredential -> the JSON shape py_webauthn parses (WebAuthn L3 §5.1 toJSON()),
  // written out for browsers that lack toJSON().
  function asJSON(credential, names) {
    const response = {};
    names.forEach((name) => {
      const value = credential.response[name];
      response[name] = value ? toB64url(value) : null;
    });
    if (credential.response.getTransports) {
      response.transports = credential.response.getTransports();
    }
    return {
      id: credential.id,
      rawId: toB64url(credential.rawId),
      type: credential.type,
      authenticatorAttachment: credential.authenticatorAttachment,
      clientExtensionResults: credential.getClientExtensionResults(),
      response: response,
    };
  }

  // One ceremony: options from the gateway, the browser's prompt, the answer back.
  async function ceremony(path, prepare, call, names, extra) {
    const options = await post(path + "/options", { csrf: csrf, rd: rd });
    prepare(options);
    say("Follow your browser's prompt: touch your security key or confirm with your device.");
    const credential = await call({ publicKey: options });
    const body = Object.assign({ csrf: csrf, rd: rd }, extra(), {
      credential: asJSON(credential, names),
    });
    const done = await post(path, body);
    window.location.assign(done.redirect);
  }

  function register() {
    return ceremony(
      "/.ztgw/webauthn/register",
      (options) => {
        options.challenge = fromB64url(options.challenge);
        options.user.id = fromB64url(options.user.id);
        options.excludeCredentials = descriptors(options.excludeCredentials);
      },
      (request) => navigator.credentials.create(request),
      ["clientDataJSON", "attestationObject"],
      () => {
        const name = document.getElementById("webauthn-name");
        return { name: name ? name.value : "" };
      },
    );
  }

  function authenticate() {
    return ceremony(
      "/.ztgw/webauthn/authenticate",
      (options) => {
        options.challenge = fromB64url(options.challenge);
        options.allowCredentials = descriptors(options.allowCredentials);
      },
      (request) => navigator.credentials.get(request),
      ["clientDataJSON", "authenticatorData", "signature", "userHandle"],
      () => ({}),
    );
  }

  function run(ceremony) {
    return (event) => {
      event.preventDefault();
      if (!window.PublicKeyCredential) {
        say("This browser cannot use security keys or passkeys.");
        return;
      }
      say("Waiting for the gateway…");
      ceremony().catch((error) => {
        if (error && error.name === "NotAllowedError") {
          say("Your security key did not answer: cancelled, timed out, or it could not verify " +
              "you. Try again.");
        } else if (error && error.name === "InvalidStateError") {
          say("This security key is registered already.");
        } else {
          say(error.message || String(error));
        }
      });
    };
  }
  const add = document.getElementById("webauthn-register");
  if (add) {
    add.addEventListener("click", run(register));
  }
  const use = document.getElementById("webauthn-authenticate");
  if (use) {
    use.addEventListener("click", run(authenticate));
  }
})();
