// The browser side of the gateway's WebAuthn ceremonies (webauthn_endpoints.py): asks the
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

  async function register() {
    const options = await post("/.ztgw/webauthn/register/options", { csrf: csrf, rd: rd });
    options.challenge = fromB64url(options.challenge);
    options.user.id = fromB64url(options.user.id);
    options.excludeCredentials = descriptors(options.excludeCredentials);
    say("Follow your browser's prompt: touch your security key or confirm with your device.");
    const credential = await navigator.credentials.create({ publicKey: options });
    const name = document.getElementById("webauthn-name");
    const done = await post("/.ztgw/webauthn/register", {
      csrf: csrf,
      rd: rd,
      name: name ? name.value : "",
      credential: {
        id: credential.id,
        rawId: toB64url(credential.rawId),
        type: credential.type,
        authenticatorAttachment: credential.authenticatorAttachment,
        clientExtensionResults: credential.getClientExtensionResults(),
        response: {
          clientDataJSON: toB64url(credential.response.clientDataJSON),
          attestationObject: toB64url(credential.response.attestationObject),
          transports: credential.response.getTransports ? credential.response.getTransports() : [],
        },
      },
    });
    window.location.assign(done.redirect);
  }

  async function authenticate() {
    const options = await post("/.ztgw/webauthn/authenticate/options", { csrf: csrf, rd: rd });
    options.challenge = fromB64url(options.challenge);
    options.allowCredentials = descriptors(options.allowCredentials);
    say("Follow your browser's prompt: touch your security key or confirm with your device.");
    const credential = await navigator.credentials.get({ publicKey: options });
    const response = credential.response;
    const done = await post("/.ztgw/webauthn/authenticate", {
      csrf: csrf,
      rd: rd,
      credential: {
        id: credential.id,
        rawId: toB64url(credential.rawId),
        type: credential.type,
        authenticatorAttachment: credential.authenticatorAttachment,
        clientExtensionResults: credential.getClientExtensionResults(),
        response: {
          clientDataJSON: toB64url(response.clientDataJSON),
          authenticatorData: toB64url(response.authenticatorData),
          signature: toB64url(response.signature),
          userHandle: response.userHandle ? toB64url(response.userHandle) : null,
        },
      },
    });
    window.location.assign(done.redirect);
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
