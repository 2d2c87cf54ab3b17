package main

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeAgent serves `POST /cmdadd` on a Unix socket with a fixed answer and records the bodies.
type fakeAgent struct {
	socket string
	bodies chan []byte
}

func startFakeAgent(t *testing.T, handler func(w http.ResponseWriter)) *fakeAgent {
	t.Helper()
	agent := &fakeAgent{socket: filepath.Join(t.TempDir(), "pluginevent.sock"), bodies: make(chan []byte, 10)}
	listener, err := net.Listen("unix", agent.socket)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/cmdadd", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/json" {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		agent.bodies <- body
		handler(w)
	})
	server := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(func() { _ = server.Close() })
	return agent
}

func answer(status int, text string) func(w http.ResponseWriter) {
	return func(w http.ResponseWriter) {
		w.WriteHeader(status)
		_, _ = io.WriteString(w, text)
	}
}

func TestAddPostsTheEventAndPrintsPrevResultUnchanged(t *testing.T) {
	for _, v := range supportedVersions {
		agent := startFakeAgent(t, answer(200, "ok"))
		conf := netConfOf(v, map[string]any{"plugin_event_socket": agent.socket})
		o := runWith(t, "ADD", conf, map[string]string{"CNI_ARGS": podArgs("shop", "web-0", testUID)})
		if o.status != 0 {
			t.Fatalf("%s: %d %q %s", v, o.status, o.out, o.log)
		}
		want, _ := json.Marshal(prevResultOf(v))
		if o.out != string(want) { // json.Marshal sorts keys: the same compact text
			t.Errorf("%s: printed %s, want %s", v, o.out, want)
		}
		body := <-agent.bodies
		wantBody := `{"Netns":"` + testNetns + `","PodName":"web-0","PodNamespace":"shop",` +
			`"IPs":[{"Address":{"IP":"10.244.1.7"}},{"Address":{"IP":"fd00:10:244:1::7"}}],"PodUID":"` + testUID + `"}`
		if string(body) != wantBody {
			t.Errorf("%s: posted %s", v, body)
		}
	}
}

func TestAddWithoutUIDOrPrevResult(t *testing.T) {
	agent := startFakeAgent(t, answer(200, "ok"))
	conf := netConfOf("0.4.0", map[string]any{"plugin_event_socket": agent.socket})
	delete(conf, "prevResult")
	o := runWith(t, "ADD", conf, nil)
	if o.status != 0 || o.out != `{"cniVersion":"0.4.0"}` {
		t.Fatalf("%d %q", o.status, o.out)
	}
	if body := string(<-agent.bodies); body != `{"Netns":"`+testNetns+`","PodName":"web-0","PodNamespace":"shop","IPs":[]}` {
		t.Errorf("posted %s", body)
	}
}

func TestAddFailsWithTheAgentsAnswer(t *testing.T) {
	for _, c := range []struct {
		status int
		text   string
		code   int
		msg    string
	}{
		{500, "cannot enter netns: gone\n", codePlugin, "ztunnel-redirect agent refused pod: cannot enter netns: gone"},
		{400, "Netns is outside", codePlugin, "ztunnel-redirect agent refused pod: Netns is outside"},
		{503, "still setting up; try again", codeTryAgainLater, "ztunnel-redirect agent refused pod: still setting up; try again"},
		{500, "", codePlugin, "ztunnel-redirect agent refused pod: Internal Server Error"},
		{413, strings.Repeat("x", 10000), codePlugin, "ztunnel-redirect agent refused pod: " + strings.Repeat("x", maxAnswer)},
	} {
		agent := startFakeAgent(t, answer(c.status, c.text))
		o := runWith(t, "ADD", netConfOf("1.0.0", map[string]any{"plugin_event_socket": agent.socket}), nil)
		e := assertError(t, o, c.code, "1.0.0")
		if e["msg"] != c.msg || !strings.HasPrefix(e["details"].(string), "HTTP ") {
			t.Errorf("HTTP %d: %v", c.status, e)
		}
	}
}

func TestExcludedNamespaceAndNonPodsNeverReachTheAgent(t *testing.T) {
	agent := startFakeAgent(t, answer(500, "must not be asked"))
	conf := netConfOf("1.0.0", map[string]any{"plugin_event_socket": agent.socket, "exclude_namespaces": []any{"shop"}})
	assertPasses(t, runWith(t, "ADD", conf, nil))
	conf = netConfOf("1.0.0", map[string]any{"plugin_event_socket": agent.socket})
	assertPasses(t, runWith(t, "ADD", conf, map[string]string{"CNI_ARGS": "IgnoreUnknown=1"}))
	if len(agent.bodies) != 0 {
		t.Errorf("the agent was asked")
	}
}

func TestAgentThatDoesNotAnswerIsUnreachable(t *testing.T) {
	// A listener that accepts and never answers: the deadline makes it unreachable.
	socket := filepath.Join(t.TempDir(), "pluginevent.sock")
	listener, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close()
	err = postAddEvent(socket, &addEvent{Netns: testNetns, PodName: "a", PodNamespace: "b", IPs: []podIP{}}, 50*time.Millisecond)
	if _, ok := err.(*unreachableError); !ok {
		t.Errorf("got %T %v", err, err)
	}
}

func TestAnswerThatIsNotHTTPIsUnreachable(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "pluginevent.sock")
	listener, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close()
	go func() {
		conn, err := listener.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		// Read the whole request first: closing before would fail our write instead.
		if r, err := http.ReadRequest(bufio.NewReader(conn)); err == nil {
			_, _ = io.ReadAll(r.Body)
			_, _ = io.WriteString(conn, "SSH-2.0-nope\r\n")
		}
	}()
	err = postAddEvent(socket, &addEvent{IPs: []podIP{}}, 5*time.Second)
	if _, ok := err.(*unreachableError); !ok || !strings.Contains(err.Error(), "not an HTTP response") {
		t.Errorf("got %T %v", err, err)
	}
}

func TestReadResponseChunked(t *testing.T) {
	agent := startFakeAgent(t, func(w http.ResponseWriter) {
		w.WriteHeader(500)
		w.(http.Flusher).Flush() // no Content-Length: net/http sends the body chunked
		_, _ = io.WriteString(w, "first ")
		w.(http.Flusher).Flush()
		_, _ = io.WriteString(w, "second")
	})
	err := postAddEvent(agent.socket, &addEvent{IPs: []podIP{}}, 5*time.Second)
	if perr, ok := err.(*pluginError); !ok || perr.msg != "ztunnel-redirect agent refused pod: first second" {
		t.Errorf("got %T %v", err, err)
	}
}
