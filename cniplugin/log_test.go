package main

import (
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeLogSocket serves `POST /log` at dir/log.sock, as the agent does, and records the batches.
func fakeLogSocket(t *testing.T, dir string) chan []string {
	t.Helper()
	listener, err := net.Listen("unix", filepath.Join(dir, logSocketName))
	if err != nil {
		t.Fatal(err)
	}
	batches := make(chan []string, 10)
	mux := http.NewServeMux()
	mux.HandleFunc("/log", func(w http.ResponseWriter, r *http.Request) {
		var batch []string
		body, _ := io.ReadAll(r.Body)
		if r.Method != http.MethodPost || json.Unmarshal(body, &batch) != nil {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		batches <- batch
	})
	server := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(func() { _ = server.Close() })
	return batches
}

func decodeLine(t *testing.T, text string) agentLine {
	t.Helper()
	var line agentLine
	if err := json.Unmarshal([]byte(text), &line); err != nil {
		t.Fatalf("not a JSON log line: %q", text)
	}
	return line
}

func TestAddSendsItsLinesWithThePodToTheAgentsLogSocket(t *testing.T) {
	agent := startFakeAgent(t, answer(200, "ok"))
	batches := fakeLogSocket(t, filepath.Dir(agent.socket))
	conf := netConfOf("1.0.0", map[string]any{"plugin_event_socket": agent.socket, "log_level": "debug"})
	o, log := runLogged(t, "ADD", conf, map[string]string{"CNI_ARGS": podArgs("shop", "web-0", testUID)})
	if o.status != 0 {
		t.Fatalf("%d %q %s", o.status, o.out, o.log)
	}
	log.flush()
	batch := <-batches
	if len(batch) != 1 {
		t.Fatalf("want the one debug line, got %q", batch)
	}
	line := decodeLine(t, batch[0])
	if line.Level != "debug" || !strings.Contains(line.Msg, "pod shop/web-0 handed to the agent") ||
		line.PodName != "web-0" || line.PodNamespace != "shop" {
		t.Errorf("line %+v", line)
	}
	if _, err := time.Parse(time.RFC3339Nano, line.Time); err != nil {
		t.Errorf("time %q: %v", line.Time, err)
	}
	// The runtime's log has the same line.
	if !strings.Contains(o.log, "DEBUG pod shop/web-0 handed to the agent") {
		t.Errorf("stderr %q", o.log)
	}
}

func TestAnAddTheAgentTookSendsItNothingAtInfo(t *testing.T) {
	// The agent logs the ADD itself: one request per pod start, not a second to echo it.
	agent := startFakeAgent(t, answer(200, "ok"))
	conf := netConfOf("1.0.0", map[string]any{"plugin_event_socket": agent.socket})
	o, log := runLogged(t, "ADD", conf, map[string]string{"CNI_ARGS": podArgs("shop", "web-0", testUID)})
	if o.status != 0 {
		t.Fatalf("%d %q %s", o.status, o.out, o.log)
	}
	if len(log.lines) != 0 || o.log != "" {
		t.Errorf("kept %q, stderr %q", log.lines, o.log)
	}
}

func TestLinesBelowTheLogLevelAreNotKeptForTheAgent(t *testing.T) {
	log := newLogger(io.Discard)
	log.setLevel("warn")
	log.infof("not sent")
	log.warnf("sent")
	if len(log.lines) != 1 || decodeLine(t, log.lines[0]).Level != "warn" {
		t.Errorf("kept %q", log.lines)
	}
}

func TestWithoutTheAgentTheAddSucceedsAndFlushReturnsAtOnce(t *testing.T) {
	// The decision file is absent too: only an excluded namespace passes without the agent.
	conf := netConfOf("1.0.0", map[string]any{
		"plugin_event_socket": absentSocket(t), "exclude_namespaces": []any{"shop"},
	})
	o, log := runLogged(t, "ADD", conf, map[string]string{"CNI_ARGS": podArgs("shop", "web-0", testUID)})
	if o.status != 0 {
		t.Fatalf("%d %q %s", o.status, o.out, o.log)
	}
	log.infof("a line to send")
	started := time.Now()
	log.flush()
	if elapsed := time.Since(started); elapsed >= logTimeout {
		t.Errorf("flush took %v without an agent", elapsed)
	}
}

func TestAnAgentThatNeverAnswersCostsAtMostTheTimeout(t *testing.T) {
	socket := filepath.Join(t.TempDir(), logSocketName)
	listener, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close()
	// Connections are accepted by the kernel and never read: the request gets no answer.
	started := time.Now()
	err = postLogs(socket, []string{`{"level":"info","msg":"x"}`}, 50*time.Millisecond)
	elapsed := time.Since(started)
	var netErr net.Error
	if !errors.As(err, &netErr) || !netErr.Timeout() {
		t.Errorf("want a timeout, got %v", err)
	}
	if elapsed > time.Second {
		t.Errorf("postLogs took %v with a 50ms timeout", elapsed)
	}
}

func TestARefusedBatchIsAnErrorNotAPanic(t *testing.T) {
	dir := t.TempDir()
	listener, err := net.Listen("unix", filepath.Join(dir, logSocketName))
	if err != nil {
		t.Fatal(err)
	}
	server := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, "too large", http.StatusRequestEntityTooLarge)
		}),
		ReadHeaderTimeout: 5 * time.Second,
	}
	go func() { _ = server.Serve(listener) }()
	defer server.Close()
	err = postLogs(filepath.Join(dir, logSocketName), []string{"{}"}, logTimeout)
	if err == nil || !strings.Contains(err.Error(), "HTTP 413") {
		t.Errorf("got %v", err)
	}
}

func TestALongMessageIsCutAndTheBatchIsBounded(t *testing.T) {
	log := newLogger(io.Discard)
	log.infof("%s", strings.Repeat("é", maxLogMessage))
	if line := decodeLine(t, log.lines[0]); len(line.Msg) > maxLogMessage+3 || !strings.HasSuffix(line.Msg, "...") {
		t.Errorf("message of %d bytes", len(line.Msg))
	}
	for i := 0; i < 100; i++ {
		log.infof("%s", strings.Repeat(`"`, maxLogMessage)) // each quote escaped twice when sent
	}
	if sent := len(mustMarshal(log.lines)); sent > maxLogBatch+1 || len(log.lines) < 2 {
		t.Errorf("batch of %d bytes in %d lines", sent, len(log.lines))
	}
}
