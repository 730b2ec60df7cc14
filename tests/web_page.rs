//! The web page of `memvp serve` in a real headless browser (Debian's Chromium, driven through
//! the DevTools protocol): load the page, choose an image in its file input, type a question,
//! press Ask, and check that the streamed answer shown equals the API's answer. `.ci/run`
//! installs Chromium; elsewhere the test says it is skipped when no browser is installed.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket, stream::MaybeTlsStream};

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().to_string()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A DevTools connection to one page.
struct Page {
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next: u64,
}

impl Page {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        self.ws.send(Message::text(json!({"id": id, "method": method, "params": params}).to_string())).unwrap();
        loop {
            let m = self.ws.read().unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true, "awaitPromise": true}));
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it gives something; errors (the page still loading) count as nothing.
    fn wait_for(&mut self, expr: &str, what: &str) -> Value {
        let start = Instant::now();
        loop {
            let r =
                self.call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true, "awaitPromise": true}));
            let v = if r.get("exceptionDetails").is_some() { Value::Null } else { r["result"]["value"].clone() };
            if v != Value::Null && v != json!(false) && v != json!("") {
                return v;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn train(dir: &Path) -> (PathBuf, PathBuf) {
    let data = memvp::data::synthetic::write_shapes(&dir.join("data"), 4, 1, 32, 5).unwrap();
    let run = dir.join("run");
    let lm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa_tied");
    let o = Command::new(env!("CARGO_BIN_EXE_memvp"))
        .args(["train", "--vision", "random:tiny", "--lm", &s(lm), "--data", &format!("jsonl:{}", data.display())])
        .args([
            "--out",
            &s(&run),
            "--max-len",
            "64",
            "--slots",
            "16",
            "--hidden-proj",
            "8",
            "--vision-adapter-dim",
            "4",
        ])
        .args(["--batch-size", "4", "--max-steps", "4", "--blr", "0.5"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = data.parent().unwrap().join("images").join("test_00000.png");
    (run, img)
}

#[test]
fn the_page_answers_as_the_api_does() {
    let Some(browser) = chromium() else {
        assert!(std::env::var_os("CI").is_none(), "CI must have Chromium (.ci/run installs it)");
        eprintln!("SKIPPED: no Chromium installed (apt-get install chromium)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (run, img) = train(tmp.path());
    let mut server = Command::new(env!("CARGO_BIN_EXE_memvp"))
        .args(["serve", "--run", &format!("shapes={}", run.display()), "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _server = Killed(server);
    let url = line.trim().strip_prefix("listening on ").unwrap().to_string();
    // The API's answer to the same question about the same image.
    let question = "What colour is the shape?";
    let b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&img).unwrap())
    };
    let body = json!({"model": "shapes", "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}")}}]}]});
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut resp = agent.post(&format!("{url}/v1/chat/completions")).send(body.to_string()).unwrap();
    let api: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    let want = api["choices"][0]["message"]["content"].as_str().unwrap().to_string();

    let profile = tmp.path().join("profile");
    let mut chrome = Command::new(browser)
        .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(chrome.stderr.take().unwrap());
    let _chrome = Killed(chrome);
    let ws_browser = loop {
        let mut l = String::new();
        assert!(err.read_line(&mut l).unwrap() > 0, "Chromium ended without a DevTools address");
        if let Some(i) = l.find("ws://") {
            break l[i..].trim().to_string();
        }
    };
    // Keep reading Chromium's stderr so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in err.lines() {});
    let port = ws_browser.trim_start_matches("ws://").split('/').next().unwrap().to_string();
    let mut t = agent.put(&format!("http://{port}/json/new?{url}/")).send_empty().unwrap();
    let target: Value = serde_json::from_str(&t.body_mut().read_to_string().unwrap()).unwrap();
    let (ws, _) = tungstenite::connect(target["webSocketDebuggerUrl"].as_str().unwrap()).unwrap();
    let mut page = Page { ws, next: 0 };
    page.call("Runtime.enable", json!({}));
    page.call("DOM.enable", json!({}));
    // The page lists the adapter.
    page.wait_for("document.querySelector('#adapter').value", "the adapter list");
    assert_eq!(page.eval("document.querySelector('#models').textContent.includes('shapes')"), json!(true));
    // Choose the image in the file input, as a user would.
    let doc = page.call("DOM.getDocument", json!({}));
    let input = page.call("DOM.querySelector", json!({"nodeId": doc["root"]["nodeId"], "selector": "#file"}));
    page.call("DOM.setFileInputFiles", json!({"nodeId": input["nodeId"], "files": [s(&img)]}));
    page.wait_for("document.querySelector('#preview').src.startsWith('data:image/png')", "the image preview");
    page.eval(&format!("document.querySelector('#question').value = {}", json!(question)));
    page.eval("document.querySelector('#ask').click()");
    let state = page
        .wait_for("document.body.dataset.state === 'running' ? '' : (document.body.dataset.state || '')", "the answer");
    assert_eq!(state, json!("done"), "status: {}", page.eval("document.querySelector('#status').textContent"));
    let shown = page.eval("document.querySelector('#answer').textContent");
    assert_eq!(shown, json!(want), "the page shows another answer than the API");
    let ttft = page.eval("document.querySelector('#ttft').textContent");
    assert!(ttft.as_str().unwrap().parse::<f64>().is_ok(), "time to first token not shown: {ttft}");
    // The image was seen before by the API: its visual memory came from the cache.
    assert_eq!(page.eval("document.querySelector('#cache').textContent"), json!("from the cache"));
}
