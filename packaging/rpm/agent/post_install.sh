# gpuops-agent %post: system user, credential store, agent enabled and started.
systemd-sysusers gpuops.conf || :
if getent group video >/dev/null; then
	usermod -a -G video gpuops || :
fi
systemd-tmpfiles --create gpuops.conf || :
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || :
	if [ "$1" -eq 1 ]; then
		systemctl enable --now gpuops-agent.service || :
	else
		systemctl try-restart gpuops-agent.service || :
	fi
fi
